"""Command-line plumbing shared by the entry points: one-line errors and override checks."""

from __future__ import annotations

import difflib
import functools
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from siamese.config import user_error_in

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
EXIT_USER_ERROR = 2


# The last line ``fail`` printed: a sweep job that stops on it records it (SweepSummary).
last_error: str | None = None


def fail(message: str) -> None:
    """Print ``error: message`` on one line to stderr and exit with status 2."""
    global last_error
    last_error = f"error: {message}"
    print(last_error, file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def report_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a SiameseError raised by ``fn`` into one line and a non-zero exit, and a
    Ctrl-C into one line and exit 130 (Python would print a traceback). train.py's own
    Ctrl-C line while fitting comes first (an exit, not an interrupt, by then)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            print(
                "stopped: Ctrl-C (SIGINT) before the run finished; run it again to start over",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(128 + 2)  # 130, as a shell reports a process stopped by SIGINT
        except Exception as exc:
            cause = user_error_in(exc)  # also unwraps Hydra's InstantiationException
            if cause is None:
                raise
            fail(str(cause))

    return wrapper


def group_options(group: str, conf_dir: Path = CONF_DIR) -> list[str] | None:
    """The options of a config group, or None when ``group`` is not a group folder."""
    folder = conf_dir / group
    if not folder.is_dir():
        return None
    return sorted(p.stem for p in folder.glob("*.yaml"))


@functools.cache
def config_values(conf_dir: Path = CONF_DIR) -> dict[str, list[tuple[Any, str]]]:
    """Every dotted key any config file under ``conf_dir`` can put into a composed config
    (each file read where its package puts it: its group, or ``# @package``), with each
    value it has there and the file (relative to ``conf_dir``) that sets it."""
    values: dict[str, list[tuple[Any, str]]] = {}

    def walk(node: Any, prefix: str, file: str) -> None:
        if isinstance(node, dict):
            items = [(n, v) for n, v in node.items() if prefix or n != "defaults"]
        elif isinstance(node, list):  # list items by index (model.layers.0.out_channels)
            items = list(enumerate(node))
        else:
            return
        for name, value in items:
            path = f"{prefix}.{name}" if prefix else str(name)
            values.setdefault(path, []).append((value, file))
            walk(value, path, file)

    for file in sorted(conf_dir.rglob("*.yaml")):
        text = file.read_text()
        relative = file.relative_to(conf_dir).as_posix()
        package = ".".join(file.relative_to(conf_dir).parent.parts)
        first = text.lstrip().splitlines()[0] if text.strip() else ""
        if first.startswith("# @package"):
            package = first.split("@package", 1)[1].strip()
            package = "" if package == "_global_" else package
        try:
            node = yaml.safe_load(text)
        except yaml.YAMLError:
            continue  # Hydra reports a broken file itself
        walk(node, package, relative)
        # A defaults entry "csv@csv" puts a config at a package of its own (logger.csv).
        entries = node.get("defaults", []) if isinstance(node, dict) else []
        for entry in entries if isinstance(entries, list) else []:
            for spec in [entry] if isinstance(entry, str) else list(entry or {}):
                if isinstance(spec, str) and "@" in spec:
                    at = spec.split("@", 1)[1].split(":")[0].strip()
                    values.setdefault(f"{package}.{at}" if package else at, [])
    return values


def config_keys(conf_dir: Path = CONF_DIR) -> frozenset[str]:
    """Every dotted key any config file under ``conf_dir`` can put into a composed config."""
    return frozenset(config_values(conf_dir))


def check_key_overrides(argv: Sequence[str], conf_dir: Path = CONF_DIR) -> None:
    """Fail with one line for ``a.b=value`` whose last name no config file has anywhere
    (a typo: Hydra would refuse it with a five-line report), naming the closest key.

    A key whose name some file has, even at another place, is left to Hydra, so nothing
    valid is refused: experiments and presets may put keys anywhere."""
    dotted = []
    added: set[str] = set()  # +key=value earlier on the line (a resumed run's own): known
    for arg in argv:
        if arg.startswith("+") and "=" in arg:
            added.add(_override_key(arg))
        if arg.startswith(("-", "+", "~")) or "=" not in arg:
            continue
        key = arg.split("=", 1)[0]
        if any(key == a or key.startswith(f"{a}.") for a in added):
            continue
        if "." in key and not key.startswith("hydra.") and not set("/@:") & set(key):
            dotted.append((key, arg))
    if not dotted:
        return
    keys = config_keys(conf_dir)
    names = {k.rsplit(".", 1)[-1] for k in keys}
    chosen = _chosen_option_keys(argv, conf_dir)
    _check_nested_group_keys(argv, [k for k, _ in dotted], conf_dir)
    for key, arg in dotted:
        group = key.split(".", 1)[0]
        if group in chosen and key not in chosen[group][1]:
            # model=resnet18 model.hidden_dims=[128]: Hydra's answer is a five-line report.
            option, own = chosen[group]
            parts = key.split(".")
            missing = next(
                ".".join(parts[:i])
                for i in range(2, len(parts) + 1)
                if ".".join(parts[:i]) not in own
            )
            parent = missing.rsplit(".", 1)[0]
            here = sorted(
                k[len(parent) + 1 :]
                for k in own
                if k.startswith(f"{parent}.") and "." not in k[len(parent) + 1 :]
            )
            has = f"; {parent} has: {', '.join(here)}" if here else ""
            fail(
                f"{missing} is not a key of {group}={option}{has} "
                f"(+{arg} would add it as a new key)"
            )
        if key in keys or key.rsplit(".", 1)[-1] in names:
            continue
        close = difflib.get_close_matches(key, sorted(keys), n=1, cutoff=0.7)
        parent = key.rsplit(".", 1)[0]
        siblings = sorted(
            k[len(parent) + 1 :]
            for k in keys
            if k.startswith(f"{parent}.") and "." not in k[len(parent) + 1 :]
        )
        if close:
            hint = f"; did you mean {close[0]}?"
        elif siblings:
            hint = f"; {parent} has: {', '.join(siblings)}"
        else:
            hint = ""
        fail(f"{key} is not a key of any config{hint} (+{arg} would add it as a new key)")


def _nested_choice(argv: Sequence[str], nested: str, conf_dir: Path) -> str | None:
    """The option of a nested group (``data/augment``) this command line composes: its own
    ``data/augment=X``, else the default of the chosen ``data=`` option (or of train.yaml's);
    None when that cannot be told from the files (an experiment may override it)."""
    parent, sub = nested.split("/", 1)
    option = None
    for arg in argv:
        if arg.startswith(("~", "+")) and _override_key(arg) in (nested, nested.replace("/", ".")):
            return None  # dropped or added: Hydra's own checks
        if "=" not in arg or arg.startswith(("-", "+", "~")):
            continue
        key, value = arg.split("=", 1)
        if key == nested:
            return value
        if key == "experiment" or (key == nested.replace("/", ".") and value == "null"):
            return None
        if key == parent:
            option = value
    if option is None:
        train = yaml.safe_load((conf_dir / "train.yaml").read_text()) or {}
        option = next(
            (e[parent] for e in train.get("defaults") or [] if isinstance(e, dict) and parent in e),
            None,
        )
    file = conf_dir / parent / f"{option}.yaml"
    if option is None or not file.is_file():
        return None
    node = yaml.safe_load(file.read_text()) or {}
    for entry in node.get("defaults") or [] if isinstance(node, dict) else []:
        if isinstance(entry, dict) and sub in entry:
            return entry[sub]
    return None


def _check_nested_group_keys(argv: Sequence[str], keys: Sequence[str], conf_dir: Path) -> None:
    """``data.augment.brightness=0.3`` on a run whose ``data/augment`` option has no such
    key (it belongs to another option): one line naming the option, its keys and the ones
    that have it, instead of Hydra's "not in struct" report."""
    values = config_values(conf_dir)
    for key in keys:
        parts = key.split(".")
        if len(parts) < 3 or not (conf_dir / parts[0] / parts[1]).is_dir():
            continue
        nested = f"{parts[0]}/{parts[1]}"
        option = _nested_choice(argv, nested, conf_dir)
        if option is None:
            continue
        prefix = f"{parts[0]}.{parts[1]}"
        own = {
            k for k, seen in values.items() if any(f == f"{nested}/{option}.yaml" for _, f in seen)
        }
        if not own or key in own:
            continue
        others = [
            o
            for o in group_options(nested, conf_dir) or []
            if any(f == f"{nested}/{o}.yaml" for _, f in values.get(key, []))
        ]
        mine = sorted(k[len(prefix) + 1 :] for k in own if k.count(".") == 2)
        where = f"; {nested}={' or '.join(others)} has it" if others else ""
        fail(f"{key} is not a key of {nested}={option} ({prefix} has: {', '.join(mine)}){where}")


def option_keys(group: str, option: str, conf_dir: Path = CONF_DIR) -> set[str] | None:
    """The keys ``group=option`` puts into a composed config: its file's, and those of the
    options its defaults list pulls in (``trainer/cpu.yaml`` extends ``default``;
    ``logger/many.yaml`` puts ``csv`` at ``logger.csv``). None when that cannot be told from
    the files alone: a ``@package _global_`` option (it may add keys anywhere), a missing
    file, or a defaults entry of another kind (``override``, another group)."""
    file = conf_dir / group / f"{option}.yaml"
    if not file.is_file():
        return None
    text = file.read_text()
    if text.lstrip().startswith("# @package"):
        return None
    try:
        node = yaml.safe_load(text) or {}
    except yaml.YAMLError:
        return None
    if not isinstance(node, dict):
        return None
    relative = f"{group}/{option}.yaml"
    keys = {k for k, seen in config_values(conf_dir).items() if any(f == relative for _, f in seen)}
    for entry in node.get("defaults") or []:
        if entry == "_self_":
            continue
        if not isinstance(entry, str) or "/" in entry or ":" in entry:
            return None
        name, _, at = entry.partition("@")
        inner = option_keys(group, name.strip(), conf_dir)
        if inner is None:
            return None
        if at:  # re-rooted under group.at
            inner = {f"{group}.{at.strip()}{k[len(group) :]}" for k in inner}
            inner.add(f"{group}.{at.strip()}")
        keys |= inner
    return keys


def _chosen_option_keys(argv: Sequence[str], conf_dir: Path) -> dict[str, tuple[str, set[str]]]:
    """``group -> (option, the keys it puts in the config)`` for each ``group=option`` on
    the command line whose keys the files tell (``option_keys``); none at all when a
    chosen option is a ``@package _global_`` file (an experiment or preset may add keys
    anywhere)."""
    result: dict[str, tuple[str, set[str]]] = {}
    for arg in argv:
        if arg.startswith(("-", "+", "~")) or "=" not in arg:
            continue
        group, option = arg.split("=", 1)
        if "." in group or "/" in group or group_options(group, conf_dir) is None:
            continue
        file = conf_dir / group / f"{option}.yaml"
        if file.is_file() and file.read_text().lstrip().startswith("# @package _global_"):
            return {}
        keys = option_keys(group, option, conf_dir)
        if keys is not None:
            result[group] = (option, keys)
    return result


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# Keys every config file gives a bool but whose owner takes more: torch.compile options
# ({mode: max-autotune}), WandbLogger's log_model=all, Trainer(deterministic="warn"),
# ModelCheckpoint(save_last="link").
NOT_ONLY_BOOL = frozenset(
    {
        "model.compile",
        "logger.log_model",
        "trainer.deterministic",
        "callbacks.model_checkpoint.save_last",
    }
)


@functools.cache
def value_kinds(conf_dir: Path = CONF_DIR) -> dict[str, tuple[str, str]]:
    """``key -> (kind, example)`` for each key that every config file gives one kind of
    value: ``bool``, ``number`` or ``numbers`` (a list of numbers). Keys that take more
    than one kind (``trainer.devices``: 2 or auto; ``NOT_ONLY_BOOL``), Hydra's own and
    ``_target_``-like keys are left out."""
    kinds: dict[str, tuple[str, str]] = {}
    for key, seen in config_values(conf_dir).items():
        if key.startswith("hydra.") or key.rsplit(".", 1)[-1].startswith("_"):
            continue
        if key in NOT_ONLY_BOOL:
            continue
        # Examples from the main configs first, then the key's own group, then the rest.
        group = key.split(".", 1)[0]
        ranked = sorted(seen, key=lambda vf: ("/" in vf[1], not vf[1].startswith(f"{group}/")))
        present = [value for value, _ in ranked if value is not None]
        if not present:
            continue
        if all(isinstance(v, bool) for v in present):
            kind, example = "bool", str(present[0]).lower()
        elif all(_is_number(v) for v in present):
            kind, example = "number", str(present[0])
        elif any(present) and all(
            isinstance(v, list) and all(_is_number(x) for x in v) for v in present
        ):
            first = next(v for v in present if v)
            kind, example = "numbers", f"[{','.join(str(x) for x in first)}]"
        else:
            continue
        kinds[key] = (kind, example)
    return kinds


_KIND_WORDS = {"bool": "true or false", "number": "a number", "numbers": "a list of numbers"}


# Number keys that also take a list of numbers: an image size as [H, W].
NUMBER_OR_LIST = frozenset({"data.image_size", "model.image_size", "data.augment.size"})


def _fits(key: str, kind: str, value: Any) -> bool:
    def later(v: Any) -> bool:  # null is a value Lightning and torch may take;
        return v is None or (isinstance(v, str) and "${" in v)  # interpolations resolve later

    if later(value):
        return True
    if kind == "bool":
        return isinstance(value, bool)
    numbers = isinstance(value, list) and all(_is_number(x) or later(x) for x in value)
    if kind == "number":
        return _is_number(value) or (numbers and key in NUMBER_OR_LIST)
    return numbers or (_is_number(value) and key in NUMBER_OR_LIST)


def check_value_overrides(argv: Sequence[str], conf_dir: Path = CONF_DIR) -> None:
    """Fail with one line for ``key=value`` whose value is not of the kind every config
    gives that key (``optimizer.lr=abc``, ``test=maybe``, ``model.hidden_dims=128``): torch,
    Lightning or Hydra would stop on it later with a traceback. Each item of a choice or
    range sweep is checked; interval sweeps are numbers by construction."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType

    kinds = value_kinds(conf_dir)
    parser = OverridesParser.create()
    for arg in argv:
        if arg.startswith(("-", "~")) or "=" not in arg:
            continue
        try:
            override = parser.parse_overrides([arg])[0]
        except Exception:  # a malformed override is Hydra's to report
            continue
        key = override.key_or_group
        if override.package is not None or key not in kinds or override.is_add():
            continue
        if override.value_type == ValueType.ELEMENT:
            items = [override.value()]
        elif override.value_type in (
            ValueType.CHOICE_SWEEP,
            ValueType.SIMPLE_CHOICE_SWEEP,
            ValueType.RANGE_SWEEP,
        ):
            items = list(override.sweep_iterator())
        else:
            continue
        kind, example = kinds[key]
        for item in items:
            if not _fits(key, kind, item):
                shown = arg.split("=", 1)[1] if len(items) == 1 else f"{item} (in {arg})"
                fail(f"{key}={shown} is not {_KIND_WORDS[kind]}; write e.g. {key}={example}")


# Hydra's options whose value is the next argument (not an override, even with a "=").
HYDRA_VALUE_OPTIONS = frozenset(
    {"-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir", "-p", "--package"}
    | {"-c", "--cfg", "--experimental-rerun"}
)


def runs_as_sweep(argv: Sequence[str], conf_dir: Path = CONF_DIR) -> bool:
    """Whether Hydra runs ``argv`` as a multirun: ``-m``, else ``hydra.mode`` on the line,
    else a file that sets ``hydra.mode: MULTIRUN`` and is chosen on the line
    (``hparams_search=optuna``) or may be chosen by default (a main config, ``hydra/``)."""
    if {"-m", "--multirun"} & set(argv):
        return True
    modes = [a.split("=", 1)[1] for a in argv if _override_key(a) == "hydra.mode" and "=" in a]
    if modes:
        return modes[-1] == "MULTIRUN"
    chosen = {f"{_override_key(a)}/{a.split('=', 1)[1]}.yaml" for a in argv if "=" in a}
    return any(
        value == "MULTIRUN" and (file in chosen or "/" not in file or file.startswith("hydra/"))
        for value, file in config_values(conf_dir).get("hydra.mode", [])
    )


def _grammar_reason(exc: Exception) -> str:
    """Where Hydra's override parser stopped, from its message, in a few words."""
    lines = str(exc).splitlines() or [type(exc).__name__]
    first = lines[0]
    if first.startswith("LexerNoViableAltException") and len(lines) > 1 and "^" in lines[1]:
        column = lines[1].index("^")  # under the first character the lexer cannot read
        if column < len(first):
            return f"it cannot read {first[column]!r} unquoted"
    if first.startswith("mismatched input '"):
        return f"it cannot read {first.split(chr(39))[1]!r} unquoted"
    return first


def _quoting_hint(parser: Any, key: str, value: str) -> str:
    """``quote it: key='value', typed in a shell as 'key="value"'`` when Hydra reads the
    quoted override as exactly ``value``; else nothing (the key is what it cannot read)."""
    shown = f"{key}='{value}'" if "'" not in value else f'{key}="{value}"'
    # What Hydra must receive: quotes that survive the shell, inside the shell's own.
    received = f'{key}="{value}"' if '"' not in value else shown
    try:
        if parser.parse_overrides([received])[0].value() != value:
            return ""
    except Exception:  # Hydra cannot read the key either: quoting the value is no fix
        return ""
    return f"quote it: {shown}, typed in a shell as {shlex.quote(received)}"


@functools.cache
def _override_parser() -> Any:
    """Hydra's own override parser (built once: it is an ANTLR grammar)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def check_override_syntax(argv: Sequence[str], conf_dir: Path = CONF_DIR) -> None:
    """Fail with one line for an override that Hydra's grammar cannot read, or reads as a
    sweep in a single run: a path such as Lightning's own ``ckpt_path=epoch=0-step=5.ckpt``,
    ``ckpt_path=modèle.ckpt`` or ``ckpt_path=a,b.ckpt``. The line shows the quoted value,
    and how to type it (a shell removes the quotes written for Hydra unless the whole
    override is quoted too); Hydra's own report is several lines without either."""
    from hydra.core.override_parser.types import ValueType

    parser = _override_parser()
    sweep_run = runs_as_sweep(argv, conf_dir)
    option_value = False  # the argument after -cn/-cp/...: not an override
    for arg in argv:
        if option_value or arg in HYDRA_VALUE_OPTIONS:
            option_value = not option_value
            continue
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        try:
            override = parser.parse_overrides([arg])[0]
        except Exception as exc:  # OverrideParseException, or the lexer's own error
            hint = _quoting_hint(parser, key, value)
            hint = (
                f"; {hint}" if hint else " (https://hydra.cc/docs/advanced/override_grammar/basic)"
            )
            fail(f"{arg}: Hydra's override grammar refuses it ({_grammar_reason(exc)}){hint}")
            continue
        if not override.is_sweep_override() or sweep_run:
            continue
        if override.value_type == ValueType.SIMPLE_CHOICE_SWEEP:
            items = ", ".join(str(v) for v in override.sweep_iterator())
            # A group takes one option: quoting would make a name no option has.
            group = "/" in key or group_options(_override_key(key), conf_dir) is not None
            hint = "" if group else _quoting_hint(parser, key, value)
            hint = f"; for one value, {hint}" if hint else ""
            fail(
                f"{arg} is a sweep over {items} (a comma separates sweep values), which runs "
                f"only with -m{hint}"
            )
        fail(f"{arg} is a sweep, which runs only with -m (one job per value)")


def check_group_overrides(argv: Sequence[str], conf_dir: Path = CONF_DIR) -> None:
    """Fail with one line for ``group=option`` where the option does not exist, for a
    ``a.b=value`` key that no config has (``check_key_overrides``) and for a value of the
    wrong kind (``check_value_overrides``).

    Hydra's own report spans a dozen lines; this catches the common typo first. Sweep lists
    (``loss=contrastive,triplet``) are checked item by item; sweep functions are left to Hydra.
    """
    check_key_overrides(argv, conf_dir)
    check_value_overrides(argv, conf_dir)
    for arg in argv:
        if arg.startswith(("-", "+", "~")) or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        # hydra/... groups also take options that plugins register (hydra/launcher=submitit_local).
        if "." in key or key.startswith("hydra/") or "(" in value or "*" in value:
            continue
        options = group_options(key, conf_dir)
        if options is None:
            continue
        if value == "null":  # Hydra's answer is a traceback
            fail(f"{key}=null cannot drop a config group; write ~{key} to run without one")
        for item in value.split(","):
            if item and item not in options:
                fail(f"unknown {key}={item}; choose one of: {', '.join(options)}")
    check_override_syntax(argv, conf_dir)


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


def replayable(override: Any, conf_dir: Path = CONF_DIR) -> bool:
    """Whether a resumed run's saved override may be replayed without the user's say-so:
    a group option that conf/ has, or a key that a config file has (set or deleted), with a
    plain value, as Hydra's own parser reads it. Not: anything that sets a ``_target_`` or
    another ``_..._`` key (``+callbacks.x._target_=torch.load``), a value holding one
    (``key={_target_: ...}``), an interpolation (``${...}``, escaped ``$\\{...\\}`` too: a
    resolver runs), a key no config file has, anything under ``hydra`` (its log file, its
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
    options = group_options(key, conf_dir) if "." not in key else None
    if options is not None:
        return parsed.is_delete() or value in options
    return key in config_keys(conf_dir)


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
        if "." in key and group in groups:
            has = option_keys(group, groups[group])
            if has is not None and key not in has:
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
        left_out = [a for a in kept if not replayable(a)]
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
        kept = [a for a in kept if replayable(a)]
        # ~callbacks.killer for a callback only those left-out overrides added: gone already
        # (Hydra would stop on deleting a key that is not there).
        added = [_override_key(a) for a in left_out if a.startswith("+")]

        def moot(arg: str) -> bool:
            key = _override_key(arg)
            return key not in config_keys() and any(
                k == key or k.startswith(f"{key}.") for k in added
            )

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
