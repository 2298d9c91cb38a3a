"""Data: sources -> labelled image tensors -> class-balanced batches or explicit pairs."""

from siamese.data.datamodule import SiameseDataModule
from siamese.data.datasets import DataSplits, FileImages, LabelledImages, TensorImages

__all__ = ["DataSplits", "FileImages", "LabelledImages", "SiameseDataModule", "TensorImages"]
