"""Building objects from config: Hydra's instantiate, with our own errors left unwrapped."""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate

from siamese.errors import SiameseError, find_in_chain


def user_error_in(exc: BaseException) -> SiameseError | None:
    """The SiameseError that caused ``exc`` (Hydra wraps errors raised by constructors)."""
    cause = find_in_chain(exc, lambda e: isinstance(e, SiameseError))
    return cause if isinstance(cause, SiameseError) else None


def build(config: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, re-raising a constructor's ConfigError/DataError as is."""
    try:
        return instantiate(config, **kwargs)
    except InstantiationException as exc:
        cause = user_error_in(exc)
        if cause is None:
            raise
        raise cause from None
