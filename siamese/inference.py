"""Load a trained model from its checkpoint alone: ``siamese.load(path).embed(images)``."""

from __future__ import annotations

import inspect
import os
import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from siamese.data.datasets import UndecodableImage, decode_image, special_file_type
from siamese.data.sources import IMAGE_EXTENSIONS, list_files
from siamese.errors import ConfigError, DataError, SiameseError
from siamese.models.backbones import without_pretrained
from siamese.module import SiameseModule, state_difference
from siamese.registry import check_checkpoint_config


def load(ckpt_path: str | Path, map_location: str | torch.device = "cpu") -> SiameseModule:
    """The SiameseModule saved in ``ckpt_path``, in eval mode, with ``.embed``/``.compare``.

    The file is read as plain data (``weights_only=True``) and the model is rebuilt from
    its stored config only after the whole config passed the registry check
    (``siamese.registry``): a checkpoint names what to build, never code to call."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise not_a_checkpoint_file(path, "pass a .ckpt from train.py")
    ckpt = check_checkpoint(path)
    model = model_from_checkpoint(ckpt, f"ckpt_path={str(path)!r}")
    return model.to(map_location).eval()


# torch.compile keywords a checkpoint may carry: options and backend could name programs.
STORED_COMPILE_KEYS = frozenset({"mode", "fullgraph", "dynamic"})


def model_from_checkpoint(ckpt: dict[str, Any], source: str) -> SiameseModule:
    """The SiameseModule that ``ckpt`` (a dict ``check_checkpoint`` passed) describes, with
    its weights.

    Everything that is not a siamese checkpoint, or that would build anything besides the
    registry, is one ConfigError line naming ``source`` and what is wrong."""
    hparams = ckpt.get("hyper_parameters")
    if not isinstance(hparams, dict):
        raise ConfigError(
            f"{source} holds no hyper_parameters (the config that rebuilds its model): a bare "
            "state_dict or another program's file, not a checkpoint of train.py; pass a .ckpt "
            "written by train.py"
        )
    params = inspect.signature(SiameseModule.__init__).parameters
    required = [
        n for n, p in params.items() if n != "self" and p.default is inspect.Parameter.empty
    ]
    lacking = [n for n in required if not isinstance(hparams.get(n), dict)]
    foreign = sorted(str(k) for k in hparams if k not in params or k == "self")
    if lacking or foreign:
        what = (
            f"its hyper_parameters lack {', '.join(lacking)}"
            if lacking
            else f"its hyper_parameters have {', '.join(foreign[:3])}, which siamese's model lacks"
        )
        raise ConfigError(
            f"{source} is not a checkpoint of siamese's model ({what}): another Lightning "
            "project's checkpoint, or an edited one; pass a .ckpt written by train.py"
        )
    check_checkpoint_config(hparams, source)  # the whole tree, before anything is built
    compile_options = hparams.get("compile", False)
    if not isinstance(compile_options, bool) and not (
        isinstance(compile_options, dict)
        and set(compile_options) <= STORED_COMPILE_KEYS
        and all(isinstance(v, str | bool | None) for v in compile_options.values())
    ):
        # torch.compile's options and backend name compilers and code to run.
        raise ConfigError(
            f"{source} stores compile={compile_options!r}; a checkpoint may hold true, false "
            f"or a dict of {', '.join(sorted(STORED_COMPILE_KEYS))} only: pass a .ckpt "
            "written by train.py"
        )
    if isinstance(hparams.get("tower"), dict):  # the state dict holds the weights: no cache
        hparams = {**hparams, "tower": without_pretrained(hparams["tower"])}
    try:
        model = SiameseModule(**hparams)
    except Exception as exc:  # a value its constructor refuses: the file was edited
        reason = " ".join(str(exc).split())[:300]  # Hydra's reason is on its second line
        if not isinstance(exc, SiameseError):
            reason = f"{type(exc).__name__}: {reason}".rstrip(": ")
        raise ConfigError(
            f"{source}: its stored config does not rebuild a model ({reason}); pass a .ckpt "
            "written by train.py"
        ) from None
    state = ckpt["state_dict"]
    difference = state_difference(state, model.state_dict())
    if difference is None:
        try:
            model.load_state_dict(state, strict=True)
        except (RuntimeError, TypeError, ValueError) as exc:
            difference = str(exc).strip().splitlines()[0]
    if difference is not None:
        raise ConfigError(
            f"{source}: its weights do not fit the model its config describes ({difference}); "
            "the file is damaged or was edited: pass a .ckpt written by train.py"
        )
    return model


def resolve_device(name: str, key: str = "device") -> torch.device:
    """``auto`` (cuda when available, else cpu) or a torch device name, checked; ``key`` is
    the setting named in the one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{key}={name!r} is not a device; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={name} but torch sees no CUDA device; use {key}=cpu or auto")
    return device


def not_a_checkpoint_file(path: Path, hint: str, key: str = "ckpt_path") -> ConfigError:
    """The error for a ``path`` that is no file: missing (``hint`` says what to pass), or
    a folder (a run directory, say), naming a checkpoint inside it when there is one; or
    something else that is no regular file (/dev/null, a FIFO), which is never read."""
    if path.exists() and not path.is_dir():
        kind = special_file_type(path.stat().st_mode)
        return ConfigError(f"{key}={str(path)!r} is {kind}, not a checkpoint file; {hint}")
    if not path.is_dir():
        return ConfigError(f"{key}={str(path)!r} does not exist; {hint}")
    preferred = [path / "checkpoints" / "best.ckpt", path / "model.ckpt", path / "best.ckpt"]
    found = [p for p in preferred if p.is_file()] or sorted(path.rglob("*.ckpt"))[:1]
    inside = (
        f"pass a checkpoint file, e.g. {key}={found[0]}"
        if found
        else "it holds no .ckpt file; pass a checkpoint file written by train.py"
    )
    return ConfigError(f"{key}={str(path)!r} is a folder, not a checkpoint; {inside}")


def check_checkpoint(path: Path, for_resume: bool = False) -> dict[str, Any]:
    """The checkpoint at ``path`` (plain data, on the CPU); a file that is not a readable
    Lightning checkpoint is refused, naming it (``for_resume``: also one that lacks what
    Lightning reads to go on training)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if found is None:  # not a pickle of objects: a damaged or foreign file
            raise _unreadable(path, exc) from None
        what = f" ({found.group(1)})"
        raise ConfigError(
            f"ckpt_path={str(path)!r} holds pickled Python objects{what} that would run code "
            "when loaded; siamese loads checkpoints as plain data only (weights_only=True) and "
            "refused it, running nothing: pass a .ckpt written by train.py, or re-save this one "
            "as tensors and plain values from code you trust"
        ) from None
    except Exception as exc:  # any bytes that are no checkpoint: IndexError, KeyError, ...
        raise _unreadable(path, exc) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ConfigError(
            f"ckpt_path={str(path)!r} holds no model state_dict; pass a .ckpt file written by "
            "train.py"
        )
    version = ckpt.get("pytorch-lightning_version")
    if not isinstance(version, str):
        raise ConfigError(
            f"ckpt_path={str(path)!r} has no pytorch-lightning_version, so Lightning did not "
            "write it; pass a .ckpt file written by train.py"
        )
    major = re.match(r"\s*(\d+)\.", version)
    if major is None or int(major.group(1)) < 2:
        raise ConfigError(
            f"ckpt_path={str(path)!r} says it was written by Lightning {version!r}; siamese "
            "checkpoints come from Lightning 2 or newer (train.py): pass a .ckpt written by "
            "train.py"
        )
    if for_resume:
        lacking = [k for k in RESUME_KEYS if k not in ckpt]
        if lacking or not isinstance(ckpt.get("loops"), dict):
            raise ConfigError(
                f"ckpt_path={str(path)!r} lacks {', '.join(lacking) or 'its loops state'}, "
                "which a resume needs (a weights-only or edited checkpoint); start a new run, "
                "or resume from a last.ckpt written by train.py"
            )
    return ckpt


# What Lightning reads from a checkpoint to go on training (fit's ckpt_path).
RESUME_KEYS = ("epoch", "global_step", "loops", "optimizer_states", "lr_schedulers")


def _unreadable(path: Path, exc: BaseException) -> ConfigError:
    text = str(exc).strip()
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)  # torch's real reason
    first_line = detail.group(1) if detail else (text.splitlines()[0] if text else "")
    # torch's zip reader goes on for sentences ("This is an internal miniz error. ...").
    reason = first_line.split(". ")[0].rstrip(".") or type(exc).__name__
    if not isinstance(exc, RuntimeError | OSError | EOFError | ValueError):
        reason = "not a file that torch.save wrote"  # the unpickler tripped on other bytes
    size = path.stat().st_size if path.is_file() else 0
    return ConfigError(
        f"ckpt_path={str(path)!r} is not a readable checkpoint ({size:,} bytes; {reason}): "
        "truncated or damaged, or not a checkpoint; pass a .ckpt file written by train.py"
    )


def read_images(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    like: SiameseModule,
) -> tuple[torch.Tensor, list[str]]:
    """Image files read as the model expects them: (N, C, H, W) floats in [0, 1], and paths.

    ``source`` is a folder (every image file below it, sorted by path, hidden ones and
    ``__MACOSX`` left out, as ``siamese.data.sources.list_files`` finds them) or a list of files;
    each is converted to the model's channels and resized to its input size. A file that
    cannot be decoded (damaged, empty, missing, not an image) is one DataError line naming
    it, after every file was tried (the count of the others is in it).
    """
    if isinstance(source, str | os.PathLike):
        root = Path(source).expanduser()
        if not root.is_dir():
            raise DataError(f"{str(root)!r} is not a folder; pass a folder of images or a list")
        # Linked folders followed, loops skipped with a warning; a FIFO named like an image
        # is listed, so that decode_image refuses it below instead of blocking on it.
        paths = list_files(str(root)).images
        if not paths:
            raise DataError(
                f"no image files in {str(root)!r} (looked for {' '.join(sorted(IMAGE_EXTENSIONS))})"
            )
    else:
        paths = [str(p) for p in source]
    channels, height, width = like.tower.input_shape
    images, bad = [], []
    for path in paths:
        try:
            images.append(decode_image(path, (height, width), channels))
        except UndecodableImage as exc:
            bad.append((path, exc.reason))
    if bad:
        path, reason = bad[0]
        more = f" (and {len(bad) - 1} more of the {len(paths)} files)" if len(bad) > 1 else ""
        raise DataError(
            f"cannot read image {path!r} ({reason}){more}; fix or remove it, or leave it out of "
            "the files passed to read_images"
        )
    if not images:
        return torch.empty((0, channels, height, width)), paths
    return torch.stack(images), paths
