"""Building objects from config: Hydra's instantiate, with our own errors left unwrapped."""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate

from siamese.errors import ConfigError, SiameseError, find_in_chain


def user_error_in(exc: BaseException) -> SiameseError | None:
    """The SiameseError that caused ``exc`` (Hydra wraps errors raised by constructors)."""
    cause = find_in_chain(exc, lambda e: isinstance(e, SiameseError))
    return cause if isinstance(cause, SiameseError) else None


def build(config: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, re-raising a constructor's ConfigError/DataError as is,
    and Hydra's own refusal of a ``_target_`` (its blocklist: ``os.system``; a name that
    does not import) as one ConfigError line."""
    try:
        return instantiate(config, **kwargs)
    except InstantiationException as exc:
        cause = user_error_in(exc)
        if cause is not None:
            raise cause from None
        text = " ".join(str(exc).split())  # Hydra's message spans several lines
        if "blocklisted" in text or text.startswith("Error locating target"):
            text = text.split(", set env var HYDRA_FULL_ERROR")[0]
            raise ConfigError(
                f"Hydra refused to build a _target_: {text}; use one of the classes conf/ "
                "offers for it"
            ) from None
        raise
