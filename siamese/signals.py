"""Re-export: the signal handling lives in ``siamese.callbacks.signals``."""

from siamese.callbacks.signals import (
    INSIST_AFTER_S,
    end_at_once_if_insisted,
    owns_default_sigterm,
    stop_on_sigterm,
)

__all__ = ["INSIST_AFTER_S", "end_at_once_if_insisted", "owns_default_sigterm", "stop_on_sigterm"]
