"""utils/distributed.py: the one funnel for collectives, devices per rank."""
from pathlib import Path

import pytest
import torch

import utils.distributed as distributed
from errors import UserError
from tests.helpers import FAKE_GPU, ROOT
from utils.distributed import (
    DistContext,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    broadcast_from,
    gather_interleaved,
    resolve_device,
)


class DeviceCheckingCollectives:
    """Stands in for torch.distributed: refuses, as NCCL does, any tensor not on ``device``."""

    def __init__(self, device):
        self.device, self.calls = device, []

    def _check(self, op, tensors):
        for t in tensors:
            assert t.device == self.device, f"{op} got a tensor on {t.device}, the run is on {self.device}"
        self.calls.append(op)

    def all_gather(self, parts, t):
        self._check("all_gather", [t, *parts])

    def all_reduce(self, t):
        self._check("all_reduce", [t])

    def broadcast(self, t, src):
        self._check("broadcast", [t])

    def barrier(self):
        self._check("barrier", [])


@pytest.fixture
def fake_gpu_run(monkeypatch):
    fake = DeviceCheckingCollectives(FAKE_GPU)
    monkeypatch.setattr(distributed, "dist", fake)
    return DistContext(0, 2, 0, FAKE_GPU), fake


def test_collectives_hand_over_cpu_tensors_on_the_runs_device(fake_gpu_run):
    """The first torchrun extraction on GPUs crashed: image keys (CPU int64) went to all_gather as they were."""
    ctx, fake = fake_gpu_run
    keys = torch.arange(10, dtype=torch.int64)  # (N,) on the CPU, as image_keys gives them
    feats = torch.zeros(10, 4, device=FAKE_GPU)
    assert gather_interleaved(keys[:5], 10, ctx, block=5).dtype == torch.int64
    assert gather_interleaved(feats[:5], 10, ctx, block=5).device == FAKE_GPU
    broadcast_from(torch.zeros(3), 1, ctx)
    all_reduce_sum(torch.zeros(3, dtype=torch.float64), ctx)
    all_reduce_mean(torch.zeros(2), ctx)
    barrier(ctx)
    assert fake.calls == ["all_gather", "all_gather", "broadcast", "all_reduce", "all_reduce", "barrier"]


def test_no_module_calls_torch_distributed_collectives_but_the_one_that_checks_devices():
    offenders = []
    for folder in ("utils", "models", "datasets"):
        for path in Path(ROOT, folder).glob("*.py"):
            if path.name == "distributed.py":
                continue
            text = path.read_text()
            for op in ("all_reduce(", "all_gather(", "broadcast(", "barrier(", "reduce_scatter(", "gather("):
                if f"dist.{op}" in text:
                    offenders.append(f"{path.name}: dist.{op}")
    assert offenders == []


def test_cuda_asked_for_where_there_is_none_is_one_line_saying_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    for pref in ("cuda", "cuda:0"):
        with pytest.raises(UserError, match=r"^device 'cuda(:0)?' asked for, but CUDA is not available here; use "
                                            r"--device cpu$"):
            resolve_device(pref)
    assert resolve_device("auto") == torch.device("cpu")


def test_resolve_device_under_torchrun(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(UserError, match="local rank 5 needs GPU 5, but this node shows 4 GPU"):
        resolve_device("cuda", local_rank=5, world_size=8)  # more ranks on the node than GPUs
    with pytest.raises(UserError, match="device 'cuda:7' needs GPU 7, but this node shows 4"):
        resolve_device("cuda:7")
    assert resolve_device("cuda", local_rank=1, world_size=2) == torch.device("cuda", 1)
    assert resolve_device("auto", local_rank=3, world_size=4) == torch.device("cuda", 3)
    with pytest.raises(UserError, match="names one GPU.*CUDA_VISIBLE_DEVICES"):
        resolve_device("cuda:1", local_rank=0, world_size=2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)  # one process: the GPU asked for
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed.distributed_context("cuda:1") as ctx:
        assert ctx.device == torch.device("cuda", 1)
    assert chosen == [torch.device("cuda", 1)]  # the current device follows, so kernels go there too


def test_a_launched_run_binds_nccl_to_its_gpu_and_forms_a_group_even_of_one_rank(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: None)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda: "nccl")
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    with distributed.distributed_context("cuda") as ctx:
        assert ctx.distributed and ctx.world_size == 1 and ctx.device == torch.device("cuda", 1)
    assert calls == [("nccl", {"device_id": torch.device("cuda", 1)})]
    monkeypatch.delenv("RANK")
    with distributed.distributed_context("cpu") as ctx:
        assert not ctx.distributed  # a plain process: no group


def test_a_collective_refuses_a_tensor_on_another_device_and_an_unknown_operation():
    import torch

    from utils.distributed import DistContext, _collective
    ctx = DistContext(0, 2, 0, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="all_reduce: a tensor on meta handed to a collective of a run on cpu"):
        _collective(ctx, "all_reduce", torch.empty(2, device="meta"))
    with pytest.raises(ValueError, match="scatter"):
        _collective(ctx, "scatter", torch.zeros(2))


def test_rows_go_to_ranks_in_blocks_round_robin_and_come_back_in_order(monkeypatch):
    """block_rows and gather_interleaved by hand: 10 rows in blocks of 3 over 3 ranks; the all-gather
    is played by a stand-in that hands each rank's padded rows to every rank, as gloo would."""
    import torch

    import utils.distributed as distributed
    from utils.distributed import DistContext, block_rows, gather_interleaved
    expected = {0: [0, 1, 2, 9], 1: [3, 4, 5], 2: [6, 7, 8]}  # blocks 0..3 = rows 0-2, 3-5, 6-8, 9
    assert {r: block_rows(10, 3, r, 3).tolist() for r in range(3)} == expected
    assert block_rows(5, 1, 1, 2).tolist() == [1, 3] and block_rows(4, 8, 1, 2).tolist() == []
    full = torch.arange(40, dtype=torch.float32).view(10, 4)
    locals_ = {r: full[rows] for r, rows in expected.items()}

    def all_gather(ctx, op, padded, *parts, src=0):
        assert op == "all_gather" and len(parts) == 3
        for r, part in enumerate(parts):
            part.zero_()
            part[: len(locals_[r])] = locals_[r]

    monkeypatch.setattr(distributed, "_collective", all_gather)
    for rank in range(3):
        out = gather_interleaved(locals_[rank], 10, DistContext(rank, 3, rank, torch.device("cpu")), block=3)
        assert torch.equal(out, full), rank


@pytest.mark.parametrize("rank,local_rank,own,holders,exists,record,stored,held", [
    (0, 0, "A", [0, 1], False, "A", False, True),          # every rank holds it: each keeps its own
    (1, 0, None, [0], False, "from 0", True, True),        # another node lacks it: sent, and stored there
    (1, 1, None, [0], False, "from 0", False, True),       # the same node as rank 0: rank 0 stores it
    (0, 0, None, [1], False, "from 1", True, True),        # only rank 1 holds it: sent from rank 1
    (0, 0, None, [], False, "computed", True, False),      # nobody: computed together, rank 0 stores
    (1, 0, None, [], True, "computed", False, False),      # a shared folder: rank 0 wrote before the barrier ended
    (1, 0, "B", [1], False, "from 1", False, True),        # a holder keeps nothing of its own to store
])
def test_a_record_held_by_some_ranks_is_sent_from_the_lowest_holder_and_stored_where_missing(
        tmp_path, monkeypatch, rank, local_rank, own, holders, exists, record, stored, held):
    import torch

    import utils.distributed as distributed
    from utils.distributed import DistContext, agreed_record
    monkeypatch.setattr(distributed, "ranks_holding", lambda flag, ctx: holders)
    path = tmp_path / "record.json"
    barriers = []

    def barrier(ctx):  # where rank 0 stores on a folder all nodes share, its copy is there once the barrier ends
        barriers.append(ctx.rank)
        if exists:
            path.write_text("rank 0's")
    monkeypatch.setattr(distributed, "barrier", barrier)
    writes = []
    got = agreed_record(DistContext(rank, 2, local_rank, torch.device("cpu")), str(path), lambda: own,
                        lambda mine, src: f"from {src}", lambda: "computed", writes.append)
    assert got == (record, held) and writes == ([record] if stored else [])
    assert len(barriers) == 2  # every rank, whatever it holds: the same collectives
