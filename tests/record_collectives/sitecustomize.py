"""Test instrumentation, never imported by the library: with this folder on PYTHONPATH and
RECORD_COLLECTIVES=STEM, every Python process that is a rank (RANK set) appends each collective it
issues (op, first tensor's shape and dtype, broadcast source) to STEM.rank<r>, so that a test can
check that all ranks issue the same sequence (a mismatch hangs, or under NCCL silently mixes
buffers). tests/conftest.py's ``record_collectives`` fixture sets both."""
import os

STEM = os.environ.get("RECORD_COLLECTIVES")
if STEM and "RANK" in os.environ:
    import torch.distributed as dist

    def _recorded(op, fn):
        def wrapper(*args, **kwargs):
            tensor = args[0] if args else kwargs.get("tensor")
            if isinstance(tensor, list):  # all_gather(list, tensor): the tensor sent
                tensor = args[1] if len(args) > 1 else kwargs.get("tensor")
            shape = tuple(tensor.shape) if tensor is not None else ()
            dtype = tensor.dtype if tensor is not None else ""
            src = kwargs.get("src", args[1] if op == "broadcast" and len(args) > 1 else None)
            with open(f"{STEM}.rank{os.environ['RANK']}", "a") as f:
                f.write(f"{op} {shape} {dtype}{f' src {src}' if op == 'broadcast' else ''}\n")
            return fn(*args, **kwargs)
        return wrapper

    for _op in ("all_reduce", "broadcast", "all_gather", "barrier"):
        setattr(dist, _op, _recorded(_op, getattr(dist, _op)))
