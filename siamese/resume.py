"""Resuming a run: its checkpoint (``ckpt_path=last|auto``) and the replay of its saved
overrides before the command's own, with the rules of that merge in one place."""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from siamese.composition import config_keys, group_options


@functools.cache
def _override_parser() -> Any:
    """Hydra's own override parser (built once: it is an ANTLR grammar)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


RESUME_MODES = ("last", "auto")
# Checkpoint key of the run's command-line overrides (written by SiameseModule).
RUN_OVERRIDES_KEY = "run_overrides"


def _override_key(arg: str) -> str:
    """``+a.b@pkg=1`` -> ``a.b``: the key or group an override sets (or deletes)."""
    return arg.lstrip("+~").split("=", 1)[0].split("@", 1)[0]


def resumable_checkpoint(run_dir: Path, mode: str) -> Path | None:
    """The checkpoint ``ckpt_path=last|auto`` resumes in ``run_dir``, or None when there is
    none: last.ckpt, or for ``auto`` the newest of it and Lightning's ``hpc_ckpt_N.ckpt``
    (written on a SLURM requeue signal)."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if mode == "last":
        return last if last.is_file() else None
    found = [p for p in [last, *run_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


# train.py resume.trust_overrides=true: replay every saved override of a resumed run.
TRUST_KEY = "resume.trust_overrides"


def _plain(value: Any) -> bool:
    """A parsed override value with nothing for a resolver or Hydra's instantiate in it:
    numbers, bools, null, and strings without ``$`` or ``\\``, in lists and dicts whose keys
    are plain names."""
    if isinstance(value, str):
        return "$" not in value and "\\" not in value
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(
            isinstance(k, str) and not k.startswith("_") and _plain(k) and _plain(v)
            for k, v in value.items()
        )
    return value is None or isinstance(value, bool | int | float)


def option_keys(group: str, option: str) -> set[str]:
    """The keys ``group=option`` puts into the composed train config, under ``group``."""
    return {k for k in config_keys("train", [f"{group}={option}"]) if k.startswith(f"{group}.")}


def replayable(override: Any, known: frozenset[str] | None = None) -> bool:
    """Whether a resumed run's saved override may be replayed without the user's say-so:
    a group option that conf/ has, or a key of the config that the
    run's group choices compose (``known``; set or deleted), with a
    plain value, as Hydra's own parser reads it. Not: anything that sets a ``_target_`` or
    another ``_..._`` key (``+callbacks.x._target_=torch.load``), a value holding one
    (``key={_target_: ...}``), an interpolation (``${...}``, escaped ``$\\{...\\}`` too: a
    resolver runs), a key that config lacks, anything under ``hydra`` (its log file, its
    callbacks: Hydra keeps those out of a run's saved overrides), a package (``@``) or a
    sweep. The checkpoint is a file, and a file can come from a stranger."""
    if not isinstance(override, str) or ("=" not in override and not override.startswith("~")):
        return False
    try:
        parsed = _override_parser().parse_overrides([override])[0]
    except Exception:  # Hydra's grammar refuses it: nothing to replay
        return False
    key = parsed.key_or_group
    if parsed.package is not None or parsed.is_sweep_override():
        return False
    parts = key.replace("/", ".").split(".")
    if parts[0] == "hydra" or any(not p or p.startswith("_") for p in parts):
        return False
    value = None if parsed.is_delete() and "=" not in override else parsed.value()
    if not _plain(value):
        return False
    options = group_options(key) if "." not in key else None
    if options is not None:
        return parsed.is_delete() or value in options
    return key in (config_keys("train") if known is None else known)


def with_saved_overrides(argv: Sequence[str]) -> list[str]:
    """``train.py hydra.run.dir=RUN ckpt_path=last|auto [changes]``: the overrides of the
    run that wrote the checkpoint (saved in it) first, then the command's, so the resumed
    run composes the config it was trained with and only what the command names changes
    (the command's value wins, see below; ``~key`` deletes after them), as one run
    (``hydra.mode=RUN``: a sweep's job does not start a sweep again). Other commands, sweeps
    (-m) and checkpoints without saved overrides are returned as they are; an unreadable
    checkpoint is train.py's to report.

    The checkpoint, not ``RUN/.hydra/overrides.yaml``, is the record: Hydra rewrites that
    file at every start, a failed resume attempt included. Being a file, it is data: only
    ``replayable`` overrides are replayed unless the command says ``resume.trust_overrides
    =true``; one line names those left out."""
    args = list(argv)
    values = dict(a.split("=", 1) for a in args if "=" in a and not a.startswith("-"))
    run_dir, mode = values.get("hydra.run.dir"), values.get("ckpt_path")
    if mode not in RESUME_MODES or not run_dir or {"-m", "--multirun"} & set(args):
        return args
    ckpt = resumable_checkpoint(Path(run_dir).expanduser(), mode)
    if ckpt is None:
        return args
    import torch  # only when resuming: a typo elsewhere is reported before torch loads

    try:
        saved = torch.load(ckpt, map_location="cpu", weights_only=True).get(RUN_OVERRIDES_KEY)
    except Exception:
        return args
    # What the command sets wins. Its group choice replaces the run's (trainer=gpu for
    # trainer=cpu) and drops the run's keys of that group that the new option lacks; its
    # key replaces the run's value of that key and below. A run's +key=v stays before a
    # plain key=v of the command (added, then changed); a deletion (~key) applies after.
    groups: dict[str, str] = {}
    keys: dict[str, str] = {}  # key -> the command's argument for it
    for a in args:
        if a.startswith(("-", "~")) or "=" not in a:
            continue
        key = _override_key(a)
        if not a.startswith("+") and "." not in key and group_options(key) is not None:
            groups[key] = a.split("=", 1)[1]
        else:
            keys[key] = a
    keys |= {"hydra.run.dir": "", "ckpt_path": ""}
    deletes = {_override_key(a) for a in args if a.startswith("~")}

    def replaced(item: str) -> bool:
        key = _override_key(item)
        if "." not in key and key in groups:  # the run's choice, or its ~group
            return True
        for k, arg in keys.items():
            if key == k or key.startswith(f"{k}."):
                return not (key == k and item.startswith("+") and not arg.startswith("+"))
        group = key.split(".", 1)[0]
        if "." in key and group in groups and key not in option_keys(group, groups[group]):
            return True
        return item.startswith("~") and key in deletes  # the command deletes it itself

    if not isinstance(saved, list) or not all(isinstance(a, str) for a in saved):
        # Not what train.py saves: replay nothing of it, and say so.
        if saved is not None:
            print(
                f"resuming {run_dir}: {ckpt.name} holds run_overrides that are not a list of "
                "strings; none of them is replayed",
                file=sys.stderr,
                flush=True,
            )
        saved = []
    kept = [a for a in saved if not replaced(a)]
    trusted = any(
        _override_key(a) == TRUST_KEY and a.split("=", 1)[1].strip().lower() == "true"
        for a in args
        if "=" in a
    )
    if not trusted:
        # The keys of the config the kept group choices compose (the command's win).
        picks = [
            a
            for a in kept
            if "=" in a
            and not a.startswith(("~", "+"))
            and _override_key(a) not in groups
            and group_options(_override_key(a)) is not None
        ]
        known = config_keys("train", [*picks, *(f"{g}={o}" for g, o in groups.items())])
        left_out = [a for a in kept if not replayable(a, known)]
        if left_out:
            print(
                f"resuming {run_dir}: left out {len(left_out)} of the overrides saved in "
                f"{ckpt.name}, which set a _target_, an interpolation, hydra's own settings "
                f"or a key no config file has: {' '.join(left_out)}; add {TRUST_KEY}=true "
                "to replay them "
                "(only for a checkpoint you made yourself)",
                file=sys.stderr,
                flush=True,
            )
        kept = [a for a in kept if replayable(a, known)]
        # ~callbacks.killer for a callback only those left-out overrides added: gone already
        # (Hydra would stop on deleting a key that is not there).
        added = [_override_key(a) for a in left_out if a.startswith("+")]

        def moot(arg: str) -> bool:
            key = _override_key(arg)
            return key not in known and any(k == key or k.startswith(f"{key}.") for k in added)

        args = [a for a in args if not (a.startswith("~") and moot(a))]
    if not kept:
        return args
    print(
        f"resuming {run_dir} with the overrides it was trained with: {' '.join(kept)}",
        file=sys.stderr,
        flush=True,
    )
    # A sweep's job (hparams_search=optuna sets hydra.mode: MULTIRUN) resumes as one run.
    mode_given = any(_override_key(a) == "hydra.mode" for a in args)
    return kept + args + ([] if mode_given else ["hydra.mode=RUN"])
