"""The command line's formatter: Hydra's refusal of an override as one line, with its fix."""

from __future__ import annotations

import difflib
import re
import shlex
from collections.abc import Sequence
from typing import Any

from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import ListConfig, OmegaConf

from siamese.composition import choices, composed, config_keys, group_options
from siamese.resume import _override_parser
from siamese.task import report_errors  # noqa: F401  (tests import it from here)

_WORDS = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}
_PLURALS = {int: "whole numbers", float: "numbers", bool: "true or false values", str: "strings"}


def hydra_error_line(exc: BaseException, config_name: str, overrides: Sequence[str]) -> str | None:
    """Hydra's error for ``overrides`` of ``conf/<config_name>.yaml`` as one line (value,
    what was expected, how to fix it), or None when ``exc`` is no composition error."""
    text = str(exc).strip()
    if isinstance(exc, OverrideParseException):
        arg = exc.override or ""
        if arg and "=" not in arg and not arg.startswith("~") and arg in overrides:
            before = overrides[overrides.index(arg) - 1] if overrides.index(arg) else ""
            joined = f"; if it belongs to {before}, quote both: {shlex.quote(f'{before} {arg}')}"
            return f"{arg}: not key=value{joined if '=' in before else ''}"
        return _grammar_line(arg, text)
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        group, _, option = exc.missing_cfg_file.rpartition("/")
        options = exc.options or group_options(group) or []
        close = difflib.get_close_matches(option, options, n=1)
        hint = f"did you mean {group}={close[0]}? " if close else ""
        return f"unknown {group}={option}; {hint}choose one of: {', '.join(options)}"
    if isinstance(exc, ValueError) and text.startswith("Config group override must be"):
        group = next((o.split("=")[0] for o in overrides if o.endswith("=null")), "group")
        return f"{group}=null cannot drop a config group; write ~{group} to run without one"
    if not isinstance(exc, ConfigCompositionException):
        return None
    quoted = re.search(r"'([^']*)'", text)
    if text.startswith(("Ambiguous value for argument", "Sweep parameters")) and quoted:
        return _sweep_line(quoted.group(1))
    if text.startswith("Could not override") and quoted:
        arg = text.rsplit("use +", 1)[-1]
        return _key_line(quoted.group(1), arg, config_name, overrides)
    if "does not support deletion" in str(exc.__cause__ or text):
        key = next((o[1:].split("=")[0] for o in overrides if o.startswith("~")), "the key")
        group = key.replace(".", "/")
        instead = f"~{group} drops the group; " if group_options(group) is not None else ""
        return (
            f"~{key}: a key of a typed config cannot be removed; {instead}set it to a value "
            f"instead ({key}=...)"
        )
    if text.startswith("Error merging override "):
        arg = text[len("Error merging override ") :]
        return _value_line(arg, str(exc.__cause__ or ""), config_name, overrides)
    first = text.splitlines()[0] if text else type(exc).__name__
    return (
        f"{first} ({' '.join(str(exc.__cause__ or '').split()[:12])})" if exc.__cause__ else first
    )


def _others(arg: str, overrides: Sequence[str]) -> tuple[str, ...]:
    """The command's overrides without ``arg`` (the one Hydra refused) or its sweep."""
    key = arg.split("=", 1)[0]
    return tuple(o for o in overrides if o.split("=", 1)[0] != key and "," not in o)


def _key_line(key: str, arg: str, config_name: str, overrides: Sequence[str]) -> str:
    """``key`` is not in the composed config: name the closest key or the node's keys, and
    the other options of its group that have it."""
    others = _others(arg, overrides)
    keys = config_keys(config_name, others)
    parts = key.split(".")
    depth = next((i for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in keys), 0)
    parent, missing = ".".join(parts[:depth]), ".".join(parts[: depth + 1])
    try:
        picked = choices(composed(config_name, others))
    except Exception:  # the others refused too: the defaults' choices
        picked = choices(composed(config_name))
    group = parent.replace(".", "/")
    where = f"{group}={picked[group]}" if group in picked else parent or f"{config_name}.yaml"
    here = sorted(k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == parent)
    has = [
        o
        for o in (group_options(group) or [] if group in picked else [])
        if o != picked[group] and missing in config_keys(config_name, [*others, f"{group}={o}"])
    ]
    close = difflib.get_close_matches(key, sorted(keys), n=1, cutoff=0.7)
    if close and not has:
        hint = f"; did you mean {close[0]}?"
    else:
        hint = f" ({parent or 'it'} has: {', '.join(here)})"
        hint += f"; {group}={' or '.join(has)} has it" if has else ""
    return f"{missing} is not a key of {where}{hint} (+{arg} would add it as a new key)"


def _value_line(arg: str, cause: str, config_name: str, overrides: Sequence[str]) -> str:
    """A value Hydra's schema refuses: what the key takes, and an example from the config."""
    key, _, value = arg.partition("=")
    same = [o for o in overrides if o.split("=", 1)[0] == key]
    given = arg if arg in overrides or not same else same[-1]  # else a sweep's item
    shown = value if given == arg else f"{value} (in {given})"
    reason = cause.splitlines()[0] if cause else "Hydra refuses it"
    try:
        cfg = composed(config_name, _others(arg, overrides))
        parent, _, name = key.rpartition(".")
        node = (OmegaConf.select(cfg, parent) if parent else cfg)._get_node(name)
        ref, element = node._metadata.ref_type, getattr(node._metadata, "element_type", None)
        kind = _WORDS.get(ref) or f"a list of {_PLURALS.get(element, 'values')}"
        example = _as_override(
            OmegaConf.to_container(node) if isinstance(node, ListConfig) else node._value()
        )
        return f"{key}={shown} is not {kind} ({reason}); write e.g. {key}={example}"
    except Exception:  # no node to read the type from: Hydra's reason says it
        return f"{key}={shown}: {reason}"


def _as_override(value: Any) -> str:
    """A config value as the command line writes it."""
    if isinstance(value, bool) or value is None:
        return "null" if value is None else str(value).lower()
    if isinstance(value, list):
        return f"[{','.join(_as_override(v) for v in value)}]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_as_override(v)}" for k, v in value.items()) + "}"
    return str(value)


def _grammar_line(arg: str, message: str) -> str:
    """An override Hydra's grammar cannot read: where it stopped, and how to quote it."""
    key, _, value = arg.partition("=")
    first = message.splitlines()[0] if message else "unreadable"
    found = re.match(r"mismatched input '(.+?)'", first)
    lines = message.splitlines()
    if first.startswith("LexerNoViableAltException") and len(lines) > 1 and "^" in lines[1]:
        column = lines[1].index("^")  # under the first character the lexer cannot read
        found = re.match("(.*)", first[column:]) if column < len(first) else None
    reason = f"it cannot read {found.group(1)[:1]!r} unquoted" if found else first
    hint = _quoting_hint(key, value)
    hint = f"; {hint}" if hint else " (https://hydra.cc/docs/advanced/override_grammar/basic)"
    return f"{arg}: Hydra's override grammar refuses it ({reason}){hint}"


def _sweep_line(arg: str) -> str:
    """A sweep (``a,b`` or ``range(...)``) in a single run."""
    override = _override_parser().parse_overrides([arg])[0]
    key, _, value = arg.partition("=")
    if "," not in value or "(" in value:
        return f"{arg} is a sweep, which runs only with -m (one job per value)"
    items = ", ".join(str(v) for v in override.sweep_iterator())
    hint = "" if group_options(key) is not None else _quoting_hint(key, value)
    hint = f"; for one value, {hint}" if hint else ""
    return (
        f"{arg} is a sweep over {items} (a comma separates sweep values), which runs only "
        f"with -m{hint}"
    )


def _quoting_hint(key: str, value: str) -> str:
    """``quote it: key='value', typed in a shell as 'key="value"'`` when Hydra reads the
    quoted override as exactly ``value``; else nothing (the key is what it cannot read)."""
    shown = f"{key}='{value}'" if "'" not in value else f'{key}="{value}"'
    received = f'{key}="{value}"' if '"' not in value else shown  # quotes the shell keeps
    try:
        if _override_parser().parse_overrides([received])[0].value() != value:
            return ""
    except Exception:  # Hydra cannot read the key either: quoting the value is no fix
        return ""
    return f"quote it: {shown}, typed in a shell as {shlex.quote(received)}"
