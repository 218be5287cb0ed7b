"""Datasets by spec string, one registry for training and evaluation: ``KINDS`` holds every kind of
spec (``cifar10``, ``folder:PATH``, ``openood:BENCH/SET``, ...), each built by a module of its own in
this folder that defines ``KIND`` (or ``KINDS``): a new kind is one new module (docs/EXTENDING.md).
Messages and --help list the kinds from here.

``SPEC@CLASSES`` keeps the images of some classes of a labelled set: indices and ranges
(``fashion-mnist@0-4``, ``cifar10@0,1,8``) or class names (``folder:PATH@cat,dog``).
"""
import os
from typing import Dict, Tuple

import numpy as np

from datasets.images import ImageSet, SubsetImages
from datasets.kind import DatasetMissing, Kind
from errors import UserError
from utils.discovery import discover

KINDS: Dict[str, Kind] = {k.name: k for k in discover("datasets", [os.path.dirname(__file__)], ["KIND", "KINDS"],
                                                      skip=["registry"])}
SPLITS = ("train", "test", "val")  # val: the kinds that list it (OpenOOD's ID validation lists)


def known_specs() -> Tuple[str, ...]:
    """How each kind's specs are written, for messages and --help."""
    return tuple(k.usage for k in KINDS.values())


def build_dataset(spec: str, split: str, data_path: str, image_size: int, download: bool = True) -> ImageSet:
    """Spec string -> ImageSet yielding uint8 (S, S, 3) tensors. Raises DatasetMissing / UserError."""
    if split not in SPLITS:
        raise UserError(f"split must be one of {SPLITS}, got {split!r}")
    base_spec, at, class_list = spec.rpartition("@") if "@" in spec else (spec, "", "")
    name, _, arg = base_spec.partition(":")
    kind = KINDS.get(name)
    if kind is None:
        raise UserError(f"unknown dataset {spec!r}; known: {', '.join(known_specs())}")
    if split not in kind.splits:
        what = "validation" if split == "val" else split
        raise UserError(f"{spec} has no {what} split (only {', '.join(k.usage for k in KINDS.values() if split in k.splits)} "
                        f"sets have one)")
    try:
        ds = kind.build(arg, split, data_path, image_size, download)
    except DatasetMissing:
        raise
    except UserError as e:  # a malformed spec: say which, where the message does not
        raise (e if base_spec in str(e) else UserError(f"dataset {spec!r}: {e}")) from None
    if at:
        ds = select_classes(ds, base_spec, class_list)
    ds.name = spec
    return ds


def select_classes(ds: ImageSet, spec: str, class_list: str) -> ImageSet:
    """The images of ``ds`` whose class is in ``class_list`` ("0-4", "0,1,8", "cat,dog"), in dataset order."""
    if ds.labels is None:
        raise UserError(f"{spec} has no classes to select with @{class_list}")
    if not ds.classes:
        raise UserError(f"{spec}@{class_list}: {ds.no_classes_reason}, so there is no class to select; use "
                        f"{spec} without @{class_list}")
    valid = ", ".join(f"{i}={c}" for i, c in enumerate(ds.classes))
    wanted = set()
    for item in (x.strip() for x in class_list.split(",")):
        lo, dash, hi = item.partition("-")
        if item in ds.classes:
            wanted.add(ds.classes.index(item))
        elif item.isdigit() and int(item) < len(ds.classes):
            wanted.add(int(item))
        elif dash and lo.isdigit() and hi.isdigit() and int(lo) <= int(hi) < len(ds.classes):
            wanted.update(range(int(lo), int(hi) + 1))
        else:
            raise UserError(f"{spec}@{class_list}: unknown class {item!r}; the classes are {valid}")
    indices = np.flatnonzero(np.isin(ds.labels, sorted(wanted)))
    if len(indices) == 0:
        raise UserError(f"{spec}@{class_list}: no images in these classes")
    return SubsetImages(ds, indices.tolist())


def build_datasets(specs: Dict[str, str], split: str, data_path: str, image_size: int,
                   download: bool = True) -> Tuple[Dict[str, ImageSet], Dict[str, str]]:
    """Build every named set; return (sets found, {name: why missing}) so all gaps are reported at once."""
    found, missing = {}, {}
    for name, spec in specs.items():
        try:
            found[name] = build_dataset(spec, split, data_path, image_size, download)
        except DatasetMissing as e:
            missing[name] = str(e)
    return found, missing
