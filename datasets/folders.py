"""``folder:PATH``: every image below a folder (any depth, e.g. an ImageFolder); a relative PATH is
looked up under ``data_path`` first, then the working directory."""
import os

from datasets.images import FolderImages
from datasets.kind import DatasetMissing, Kind
from errors import UserError


def build(arg, split, data_path, size, download):
    if not arg:
        raise UserError("folder: needs a path, e.g. folder:LSUN or folder:/data/iSUN")
    candidates = [arg] if os.path.isabs(arg) else [os.path.join(data_path, arg), arg]
    for path in candidates:
        if os.path.isdir(path):
            return FolderImages(f"folder:{arg}", path, size)
    where = " or ".join(os.path.abspath(c) for c in candidates)
    raise DatasetMissing(f"no folder at {where}: expected a folder of images (any depth, e.g. an ImageFolder)")


KIND = Kind("folder", build, "folder:PATH")
