"""Image datasets by spec string (``cifar10``, ``folder:LSUN``, ``noise:gaussian`` ...), shared by training and
evaluation: datasets/registry.py lists the kinds, one module builds each."""
from datasets.images import ImageSet, random_subset
from datasets.kind import DatasetMissing
from datasets.registry import KINDS, build_dataset, build_datasets, known_specs

__all__ = ["ImageSet", "random_subset", "KINDS", "known_specs", "DatasetMissing", "build_dataset", "build_datasets"]
