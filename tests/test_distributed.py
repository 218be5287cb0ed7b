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
