"""What the terminal shows: the run's own lines and a last word on what to do next.

The libraries' INFO chatter (Lightning's "GPU available", its advertising tip, "Trainer
already configured with model summary callbacks") and warnings known to be harmless here go
to the command's log file only (``<run>/train.log``, Hydra's job logging), not the console.
Every other warning, and which process of a DDP job this is, still shows. Each command ends
with its run folder and the natural next command.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Sequence
from pathlib import Path

# Loggers whose INFO lines are the libraries' own chatter, not the run's.
LIBRARY_LOGGERS = (
    "pytorch_lightning",
    "lightning",
    "lightning_fabric",
    "torch",
    "faiss",
    "timm",
    "huggingface_hub",
    "matplotlib",
    "PIL",
    "urllib3",
)

# Fragments of warnings that say nothing a user can act on (each seen in a default run).
HARMLESS_WARNINGS = (
    # Lightning 2.6's pytree helper with torch >= 2.9: an internal deprecation.
    "isinstance(treespec, LeafSpec)` is deprecated",
)


# Library INFO lines a person does want to see: which process of a DDP job this is.
SHOWN_INFO = ("Initializing distributed:",)


def is_library_chatter(record: logging.LogRecord) -> bool:
    """Whether a log record is a library's INFO line or a known-harmless warning."""
    if record.name == "py.warnings":
        message = record.getMessage()
        return any(fragment in message for fragment in HARMLESS_WARNINGS)
    if record.levelno > logging.INFO:
        return False
    root = record.name.split(".", 1)[0]
    if root not in LIBRARY_LOGGERS:
        return False
    return not record.getMessage().startswith(SHOWN_INFO)


class LibraryChatter(logging.Filter):
    """Drops library chatter from the handler it is attached to (the console)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not is_library_chatter(record)


def _console_handlers(logger: logging.Logger) -> list[logging.Handler]:
    return [
        handler
        for handler in logger.handlers
        if isinstance(handler, logging.StreamHandler)
        and not isinstance(handler, logging.FileHandler)
    ]


def quiet_console() -> None:
    """Keep library chatter off the console and in the log file.

    Call it once logging is configured (inside a Hydra task function). Warnings go through
    logging (``py.warnings``), so the log file keeps every one and the console drops only
    the known-harmless ones. Lightning adds a handler of its own when it is imported before
    logging is set up; its lines then go through the root's handlers instead."""
    logging.captureWarnings(True)
    root = logging.getLogger()
    for name in LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        if root.handlers and not library.propagate:
            # Imported before logging was set up, Lightning printed on a handler of its own
            # and kept its lines from the log file: hand them to the root's handlers.
            for handler in _console_handlers(library):
                library.removeHandler(handler)
            library.propagate = True
    loggers = [root] + [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    for logger in loggers:
        for handler in _console_handlers(logger):
            if not any(isinstance(f, LibraryChatter) for f in handler.filters):
                handler.addFilter(LibraryChatter())


def shown_path(path: Path | str) -> str:
    """``path`` as a person would type it here: relative to the working directory when it
    lies inside it, else as given."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def next_steps(run_dir: Path | str, command: Sequence[str] | None = None, note: str = "") -> str:
    """The closing lines of a command: its run folder and the natural next command."""
    lines = [f"run folder: {shown_path(run_dir)}"]
    if command:
        lines.append("next: " + shlex.join(command))
    if note:
        lines.append(note)
    return "\n".join(lines)


def in_sweep() -> bool:
    """Whether this process runs a job of a Hydra sweep (``-m``): its summary closes it."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def say(text: str) -> None:
    """Lines for the person at the terminal (stdout, at once)."""
    print(text, flush=True)
