"""Labelled image sets: in-memory tensors or image files, fetched a whole batch at a time.

Every source in ``siamese.data.sources`` returns these, so samplers, pair builders and the
data module see one interface: ``targets`` (N,) int64, ``classes``, ``__getitem__`` for one
item and ``__getitems__`` for a batch (used by the DataLoader, so tensor data is sliced in
one indexing operation instead of N Python calls).

Image files are decoded when read, never when a set is built. A file that cannot be decoded
is handled by the set's ``BadFiles`` policy: refused with its path (the default), or skipped
and listed in ``bad_files.txt``. A skipped image is replaced in training batches
(``__getitems__``: another image of its class, so batches keep their shape and labels) and
left out in evaluation (``read``: fewer rows, with the item indices of those kept).

- ``base``: LabelledImages (the interface), WithIndices, DataSplits, identity_collate
- ``tensors``: TensorImages; ``files``: FileImages; ``concat``: ConcatImages
- ``decode``: decode_image (a file), decode_image_bytes (an upload) and their helpers
- ``bad_files``: BadFiles, ImageReadError
"""

from siamese.data.datasets.bad_files import BadFiles, ImageReadError, finalize_bad_files
from siamese.data.datasets.base import DataSplits, LabelledImages, WithIndices, identity_collate
from siamese.data.datasets.concat import ConcatImages
from siamese.data.datasets.decode import (
    UndecodableImage,
    decode_image,
    decode_image_bytes,
    open_regular,
    special_file_type,
    to_mode,
)
from siamese.data.datasets.files import FileImages
from siamese.data.datasets.tensors import TensorImages

__all__ = [
    "BadFiles",
    "ConcatImages",
    "DataSplits",
    "FileImages",
    "ImageReadError",
    "LabelledImages",
    "TensorImages",
    "UndecodableImage",
    "WithIndices",
    "decode_image",
    "decode_image_bytes",
    "finalize_bad_files",
    "identity_collate",
    "open_regular",
    "special_file_type",
    "to_mode",
]
