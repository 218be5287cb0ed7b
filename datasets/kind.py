"""What a dataset kind is: the prefix of its spec strings, its builder, and how its specs are
written (for messages and --help). Each kind lives in a module of its own that defines ``KIND`` (or
``KINDS``); datasets/registry.py finds them (``utils.discovery``; docs/EXTENDING.md)."""
from dataclasses import dataclass
from typing import Callable

from errors import UserError


class DatasetMissing(UserError):
    """A requested set is not on disk (and could not be downloaded); the message names path and layout."""


@dataclass(frozen=True)
class Kind:
    name: str          # a spec's kind: the part before the first ':' ("folder" in folder:LSUN)
    build: Callable    # (arg, split, data_path, image_size, download) -> ImageSet; arg: the spec after ':'
    usage: str         # how its specs are written ("folder:PATH")
    splits: tuple = ("train", "test")

