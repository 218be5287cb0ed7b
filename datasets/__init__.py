"""Image datasets by spec string (``cifar10``, ``folder:LSUN``, ``noise:gaussian`` ...), shared by training and evaluation."""
from datasets.images import ImageSet, random_subset
from datasets.registry import KNOWN_SPECS, DatasetMissing, build_dataset, build_datasets

__all__ = ["ImageSet", "random_subset", "KNOWN_SPECS", "DatasetMissing", "build_dataset", "build_datasets"]
