"""Data sources: a root folder (or the embedded MNIST subset) -> DataSplits of labelled images.

One file per kind of source; each source is a small class whose keywords are exactly its
Hydra config keys (``_target_: siamese.data.sources.ImageFolder`` plus keywords), and the
data module calls ``source.load(root)``. Splits are stratified with a fixed seed, so a run
is reproducible, and every split of one source numbers its classes from one shared
``classes`` list.

- ``mnist_subset``: MNISTSubset, the embedded default (no download)
- ``torchvision_mnist``: TorchvisionMNIST (MNIST, Fashion-MNIST, KMNIST)
- ``omniglot``: Omniglot (one-shot splits by alphabet)
- ``image_folder``: ImageFolder (root/<class>/<image>, or train/val/test of those)
- shared: ``base`` (config checks, download root), ``split`` (stratified splits),
  ``folders`` (walking folders without opening a file)
"""

from siamese.data.sources.folders import IGNORED_FOLDERS, IMAGE_EXTENSIONS, FileListing, list_files
from siamese.data.sources.image_folder import SPLIT_FOLDERS, ImageFolder
from siamese.data.sources.mnist_subset import MNISTSubset, mnist_subset_arrays
from siamese.data.sources.omniglot import Omniglot
from siamese.data.sources.split import check_train_pairs, stratified_split
from siamese.data.sources.torchvision_mnist import TorchvisionMNIST

__all__ = [
    "IGNORED_FOLDERS",
    "IMAGE_EXTENSIONS",
    "SPLIT_FOLDERS",
    "FileListing",
    "ImageFolder",
    "MNISTSubset",
    "Omniglot",
    "TorchvisionMNIST",
    "check_train_pairs",
    "list_files",
    "mnist_subset_arrays",
    "stratified_split",
]
