"""siamese: train and evaluate Siamese (similarity) networks with Lightning, Hydra and FAISS."""

from siamese.errors import ConfigError, DataError, SiameseError

__version__ = "0.1.0"


def load(ckpt_path, map_location="cpu"):
    """Rebuild a trained model from its checkpoint: ``.embed(images)``, ``.compare(a, b)``."""
    from siamese.inference import load as _load

    return _load(ckpt_path, map_location=map_location)


__all__ = ["ConfigError", "DataError", "SiameseError", "__version__", "load"]
