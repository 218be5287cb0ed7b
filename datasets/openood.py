"""OpenOOD v1.5's benchmarks, read from the data root its download script leaves (docs/USAGE.md).

    ROOT/benchmark_imglist/<BENCH>/<split>_<set>.txt   one image a line: "relative/path label"
    ROOT/images_classic/...                            CIFAR-size images (cifar10, cifar100 and their OOD sets)
    ROOT/images_largescale/...                         ImageNet-size images (imagenet200, imagenet)

Specs (``--data_path`` is the root):
- ``openood:BENCH`` is the ID set: its train split reads ``train_BENCH.txt``, test ``test_BENCH.txt``,
  val ``val_BENCH.txt``; labels are its classes (``openood:cifar10@0,1``).
- ``openood:BENCH/SET`` is an OOD set, from ``test_SET.txt`` (labels ignored).
- ``openood:BENCH/val`` is the benchmark's OOD validation list (``val_tin.txt`` for the CIFAR
  benchmarks in v1.5, ``val_cifar100.txt`` / ``val_cifar10.txt`` before; ``val_openimage_o.txt``
  for the ImageNet ones).

Paths in a list are relative to the image folder OpenOOD's evaluator gives that list: images_classic/
for cifar10 and cifar100, images_largescale/ for imagenet200 and imagenet except their ``textures``
set, which lies in images_classic/. For a benchmark not in that table, the folder holding the list's
first image is used.
"""
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

from datasets.images import ListedImages, read_text_lines
from datasets.kind import DatasetMissing, Kind
from errors import UserError

CLASSIC, LARGE = "images_classic", "images_largescale"
LISTS = "benchmark_imglist"
DOWNLOAD = "OpenOOD's download script (scripts/download/download.py in its repository) provides it"


@dataclass(frozen=True)
class Benchmark:
    folder: str                      # the image folder of its lists
    ood_val: Tuple[str, ...]         # the OOD validation list's names, newest release first
    classic: Tuple[str, ...] = ()    # sets whose images lie in images_classic/ all the same


# How to read each benchmark's lists. Its near and far OOD sets are named once, in its preset
# (config/openood_BENCH.yaml: eval.ood and eval.groups).
BENCHMARKS = {
    "cifar10": Benchmark(CLASSIC, ("val_tin.txt", "val_cifar100.txt")),
    "cifar100": Benchmark(CLASSIC, ("val_tin.txt", "val_cifar10.txt")),
    "imagenet200": Benchmark(LARGE, ("val_openimage_o.txt",), ("textures",)),
    "imagenet": Benchmark(LARGE, ("val_openimage_o.txt",), ("textures",)),
}
NOT_OOD_VAL = ("val_cinic10.txt",)  # OpenOOD's covariate-shifted ID validation list, not an OOD one


class MissingData(Exception):
    """A root or list that is not there (the registry turns it into DatasetMissing)."""


def parse_spec(arg: str) -> Tuple[str, Optional[str]]:
    """"cifar10" -> ("cifar10", None); "cifar10/tin" -> ("cifar10", "tin"); "cifar10/val" -> ("cifar10", "val")."""
    bench, _, which = arg.partition("/")
    if not bench or "/" in which or (arg.endswith("/") and not which):
        raise UserError(f"openood:{arg}: expected openood:BENCH, openood:BENCH/SET or openood:BENCH/val "
                        f"(BENCH: {', '.join(BENCHMARKS)} or another folder of {LISTS}/)")
    return bench, which or None


def list_path(root: str, bench: str, which: Optional[str], split: str) -> str:
    """The image list a spec reads (a MissingData naming the path expected where it is not there)."""
    folder = os.path.join(root, LISTS, bench)
    if not os.path.isdir(os.path.join(root, LISTS)):
        raise MissingData(f"no OpenOOD data root at {os.path.abspath(root)}: expected "
                          f"{os.path.join(os.path.abspath(root), LISTS, bench)}/ with its image lists, and the "
                          f"image folders {CLASSIC}/ and {LARGE}/ beside it ({DOWNLOAD}); pass the root as --data_path")
    if which is None:
        name = f"{split}_{bench}.txt"
    elif which == "val":
        name = ood_val_name(folder, bench)
    else:
        name = f"test_{which}.txt"
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise MissingData(f"no OpenOOD image list at {os.path.abspath(path)} ({DOWNLOAD})")
    return path


def ood_val_name(folder: str, bench: str) -> str:
    """The OOD validation list of ``bench``: its known name, newest first, else the one val_*.txt
    in ``folder`` that is neither the ID list nor a covariate-shift one."""
    known = BENCHMARKS[bench].ood_val if bench in BENCHMARKS else ()
    for name in known:
        if os.path.isfile(os.path.join(folder, name)):
            return name
    others = sorted(n for n in (os.listdir(folder) if os.path.isdir(folder) else [])
                    if n.startswith("val_") and n.endswith(".txt") and n != f"val_{bench}.txt" and n not in NOT_OOD_VAL)
    if len(others) == 1 and not known:
        return others[0]
    expected = " or ".join(known) if known else "one val_SET.txt besides val_BENCH.txt"
    raise MissingData(f"no OOD validation list for {bench} in {os.path.abspath(folder)}: expected {expected} "
                      f"({DOWNLOAD})" + (f"; found {', '.join(others)}" if others else ""))


def image_folder(root: str, bench: str, which: Optional[str], first: Optional[str]) -> str:
    """The folder the paths of a list are relative to (OpenOOD's evaluator's assignment)."""
    spec = BENCHMARKS.get(bench)
    if spec is not None:
        name = CLASSIC if which in spec.classic else spec.folder
    else:  # a benchmark of one's own: where its first image is
        name = next((f for f in (CLASSIC, LARGE) if first and os.path.isfile(os.path.join(root, f, first))), CLASSIC)
    return os.path.join(root, name)


def read_list(path: str) -> List[Tuple[int, str, str]]:
    """[(line number, relative path, label text)] of an image list, read as a text editor reads it
    (a UTF-8 byte-order mark dropped); blank lines skipped. A line that starts with whitespace is
    refused: OpenOOD splits a line at its first space, so its path would be empty."""
    entries = []
    for number, line in enumerate(read_text_lines(path), 1):
        if not line.strip():
            continue
        if line[0].isspace():
            raise UserError(f"{path}, line {number}: the line starts with whitespace ({line[:40]!r}); OpenOOD's "
                            f"lists hold 'relative/path label' with the path first")
        rel, _, label = line.partition(" ")
        entries.append((number, rel, label.strip()))
    return entries


def build(arg: str, split: str, root: str, size: int, download: bool) -> ListedImages:
    """The ImageSet of spec ``openood:ARG``; every listed file is checked before any extraction."""
    bench, which = parse_spec(arg)
    path = list_path(root, bench, which, split)
    entries = read_list(path)
    if not entries:
        raise UserError(f"OpenOOD image list {path} is empty")
    folder = image_folder(root, bench, which, entries[0][1])
    files, labels = [], []
    for number, rel, label in entries:
        where = f"{path}, line {number}"
        if os.path.isabs(rel):
            raise UserError(f"{where}: {rel!r} is an absolute path; OpenOOD's lists hold paths relative to {folder}/")
        if os.path.normpath(rel).split(os.sep)[0] == "..":  # by its spelling: links inside are the user's layout
            raise UserError(f"{where}: {rel!r} leaves the image folder {folder}/")
        full = os.path.join(folder, rel)
        if os.path.isdir(full):
            raise UserError(f"{where}: {full} is a folder, not an image file; each line names one image")
        if not os.path.isfile(full):
            raise UserError(f"{where}: the image {full} does not exist (an incomplete download? {DOWNLOAD})")
        files.append(full)
        if which is None:
            try:
                labels.append(int(label))
            except ValueError:
                raise UserError(f"{where}: expected 'relative/path label' with an integer label, got {label!r}") \
                    from None
    name = f"openood:{arg}"
    if which is None:
        images = ListedImages(name, folder, files, size, labels, [str(i) for i in range(max(labels) + 1)])
        images.no_classes_reason = f"its list {path} labels every image -1 (no class)"
        return images
    return ListedImages(name, folder, files, size)


def build_kind(arg: str, split: str, root: str, size: int, download: bool) -> ListedImages:
    try:
        return build(arg, split, root, size, download)
    except MissingData as e:
        raise DatasetMissing(str(e)) from None


KIND = Kind("openood", build_kind, "openood:BENCH[/SET|/val]", splits=("train", "test", "val"))
