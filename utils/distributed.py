"""The one place that sets up and tears down torch.distributed, and through which every collective goes.

``python script.py`` runs as a single process with no environment variables; under
``torchrun --nproc_per_node=N`` (or the Slurm launcher, submitit_train.py, which sets the same
variables) the same code runs N ranks (NCCL on GPUs, gloo on CPU). A launched run is distributed
whatever its size: one rank under torchrun still forms a process group and issues every collective.
"""
import logging
import os
import secrets
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, TypeVar

import torch
import torch.distributed as dist

from errors import UserError

log = logging.getLogger("dlsr")

T = TypeVar("T")


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    local_world_size: int = 1  # processes of this run on this node (torchrun's LOCAL_WORLD_SIZE)
    launched: bool = False      # a process group exists (torchrun or the Slurm launcher), even of one rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.launched or self.world_size > 1

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def resolve_device(pref: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """The device of this process. Under torchrun (``world_size`` > 1) each rank takes the GPU of its
    local rank: a fixed ``cuda:N`` would put every rank on GPU N (NCCL: "Duplicate GPU"), so it is
    refused there; CUDA_VISIBLE_DEVICES chooses which GPUs a node's ranks see."""
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device {pref!r} asked for, but CUDA is not available here; use --device cpu")
        if ":" in pref and world_size > 1:
            raise UserError(f"device {pref!r} names one GPU, but torchrun starts {world_size} processes and each "
                            f"takes the GPU of its local rank; use --device cuda (choose the GPUs with "
                            f"CUDA_VISIBLE_DEVICES)")
        visible = torch.cuda.device_count()
        index = int(pref.split(":")[1]) if ":" in pref else local_rank
        if index >= visible:
            who = f"device {pref!r}" if ":" in pref else f"local rank {local_rank}"
            raise UserError(f"{who} needs GPU {index}, but this node shows {visible} GPU(s) "
                            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start at most "
                            f"{visible} process(es) per node (--nproc_per_node / --gpus_per_node)")
        return torch.device(pref if ":" in pref else f"cuda:{local_rank}")
    return torch.device("cpu")


def use_device(device: torch.device) -> None:
    """Make ``device`` the current CUDA device (kernels, NCCL and the caching allocator follow it)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def launched() -> bool:
    """Whether a launcher (torchrun, submitit_train.py) started this process as a rank."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launched_as_main() -> bool:
    """Whether this process is rank 0 (or the one process): the one that logs and writes."""
    return not launched() or os.environ["RANK"] == "0"


@contextmanager
def distributed_context(device_pref: str = "auto"):
    """Yield a DistContext; when launched as a rank, init the process group (even of one rank) and
    always destroy it on exit."""
    if not launched():
        device = resolve_device(device_pref)
        use_device(device)
        yield DistContext(0, 1, 0, device)
        return
    world = int(os.environ["WORLD_SIZE"])
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_pref, local_rank, world)
    use_device(device)
    if device.type == "cuda":  # NCCL binds its communicator to this GPU at once
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    if rank == 0:
        log.info("process group: %s, %d rank(s)", dist.get_backend(), world)
    try:
        yield DistContext(rank, world, local_rank, device, int(os.environ.get("LOCAL_WORLD_SIZE", world)), True)
    finally:
        dist.destroy_process_group()


# Every collective of the project goes through ``_collective``: each tensor is handed over on the
# context's device (NCCL takes CUDA tensors only; gloo the CPU ones), so that a tensor left on
# another device is a clear error here, not a crash (or silently mixed buffers) inside NCCL.


def _collective(ctx: DistContext, op: str, *tensors: torch.Tensor, src: int = 0) -> None:
    for t in tensors:
        if t.device != ctx.device:
            raise RuntimeError(f"{op}: a tensor on {t.device} handed to a collective of a run on {ctx.device}")
    if op == "barrier":
        dist.barrier()
    elif op == "all_reduce":
        dist.all_reduce(tensors[0])
    elif op == "broadcast":
        dist.broadcast(tensors[0], src)
    elif op == "all_gather":
        dist.all_gather(list(tensors[1:]), tensors[0])
    else:
        raise ValueError(op)


def on_device(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """``t`` on the run's device, contiguous: how a tensor is handed to a collective."""
    return t.to(ctx.device).contiguous()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        _collective(ctx, "barrier")


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The sum of ``t`` over the ranks, on every rank (on the run's device; ``t`` is left as it was)."""
    if not ctx.distributed:
        return t
    t = on_device(t, ctx).clone()
    _collective(ctx, "all_reduce", t)
    return t


def all_reduce_mean(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if not ctx.distributed:
        return t
    return all_reduce_sum(t, ctx) / ctx.world_size


def block_rows(total: int, block: int, rank: int, world_size: int) -> torch.Tensor:
    """Row indices of blocks rank, rank + W, rank + 2W, ... of ``block`` consecutive rows, in order."""
    rows = torch.arange(total)
    return rows[(rows // block) % world_size == rank]


def gather_interleaved(local: torch.Tensor, total: int, ctx: DistContext, block: int = 1) -> torch.Tensor:
    """Rank r holds the rows ``block_rows(total, block, r, W)`` of a (total, ...) tensor, in order;
    return the whole tensor on every rank, on the run's device."""
    if not ctx.distributed:
        return local
    owned = [block_rows(total, block, r, ctx.world_size) for r in range(ctx.world_size)]
    padded = torch.zeros((max(len(o) for o in owned), *local.shape[1:]), dtype=local.dtype, device=ctx.device)
    padded[: local.shape[0]] = on_device(local, ctx)
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    _collective(ctx, "all_gather", padded, *parts)
    out = padded.new_empty((total, *local.shape[1:]))
    for rows, part in zip(owned, parts):
        out[rows.to(out.device)] = part[: len(rows)]
    return out


def ranks_holding(flag: bool, ctx: DistContext) -> list:
    """The ranks for which ``flag`` is true, the same list on every rank."""
    if not ctx.distributed:
        return [0] if flag else []
    have = torch.zeros(ctx.world_size, device=ctx.device)
    have[ctx.rank] = float(flag)
    _collective(ctx, "all_reduce", have)
    have = have.tolist()
    return [r for r in range(ctx.world_size) if have[r] > 0]


def broadcast_from(t: torch.Tensor, src: int, ctx: DistContext) -> torch.Tensor:
    """``t`` of rank ``src`` on every rank (every rank passes a tensor of the same shape and dtype)."""
    if not ctx.distributed:
        return t
    buf = on_device(t, ctx)
    _collective(ctx, "broadcast", buf, src=src)
    return buf


def agreed_record(ctx: DistContext, path: str, read: Callable[[], Optional[T]], share: Callable[[Optional[T], int], T],
                  compute: Callable[[], T], store: Callable[[T], None]) -> Tuple[T, bool]:
    """A record kept in a file under a key (a feature cache, a calibration), that every rank ends up
    holding, with one decision taken by all ranks together: each rank reads its own copy (``read()``,
    None where it has none or it is stale); if every rank has one, each keeps its own; if some do,
    the lowest of them sends it to the others (``share(own or None, src)``, called on every rank);
    if none do, all ranks compute it together (``compute()``). Then rank 0, and the first process of
    every other node that still lacks ``path``, store it (``store(record)``), so nodes with their
    own disks each get a copy and a shared folder gets one. Returns (the record, whether it was held).
    """
    own = read()
    holders = ranks_holding(own is not None, ctx)
    if len(holders) == ctx.world_size:
        record = own
    elif holders:
        record = share(own, holders[0])
    else:
        record = compute()
    if own is None and ctx.is_main:
        store(record)
    barrier(ctx)
    if own is None and not ctx.is_main and ctx.local_rank == 0 and not os.path.isfile(path):
        store(record)
    barrier(ctx)
    return record, bool(holders)


def shared_token(ctx: DistContext) -> str:
    """A random hex token, the same on every rank: names that two runs never share (part files)."""
    token = torch.tensor([secrets.randbits(62)], dtype=torch.int64)
    return f"{int(broadcast_from(token, 0, ctx).item()):x}"


def agree(ok: bool, ctx: DistContext) -> bool:
    """True on every rank if ``ok`` is true on every rank (a check one rank makes, all ranks act on)."""
    return len(ranks_holding(not ok, ctx)) == 0


def stop_unless_main_agrees(check: Callable[[], Optional[str]], ctx: DistContext) -> None:
    """Run ``check`` on rank 0; if it returns a problem, every rank stops (rank 0 with its message)."""
    problem = check() if ctx.is_main else None
    if not agree(problem is None, ctx):
        raise UserError(problem or "rank 0 refused to go on (see its error)")
