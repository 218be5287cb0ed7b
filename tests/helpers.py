"""Shared by the tests: a tiny config on disk and a runner for the real entry scripts."""
import os
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config_dict(tmp_path) -> dict:
    return {
        "data_path": str(tmp_path / "data"),
        "output_dir": str(tmp_path / "ckpt"),
        "cache_dir": str(tmp_path / "cache"),
        "device": "cpu",
        "download": False,
        "num_workers": 0,
        "extract_batch_size": 128,
        "backbone": {"name": "efficientnet-lite0", "input_size": 32},
        "lfdn": {"model_channels": 64, "time_embed_dim": 32, "bottleneck_channels": 64, "num_res_blocks": 2},
        "train": {"dataset": "digits", "subset": 256, "batch_size": 32, "epochs": 3, "lr": 1.0e-3,
                  "save_every": 2, "weight_decay": 0.02},
        "eval": {"dataset": "digits", "ood": {"gauss": "noise:gaussian:200", "photos": "photos:200"},
                 "batch_size": 64},
    }


class Tiny:
    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.cfg = tiny_config_dict(tmp_path)
        self.ckpt = tmp_path / "ckpt"

    def write(self, name="tiny.yaml", **sections) -> str:
        cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.cfg.items()}
        for key, value in sections.items():
            if isinstance(value, dict):
                cfg[key] = {**cfg.get(key, {}), **value}
            else:
                cfg[key] = value
        path = self.tmp / name
        path.write_text(yaml.safe_dump(cfg))
        return str(path)


def run_script(script: str, *args: str, torchrun: int = 0, check: bool = True, timeout: int = 300, threads: int = 0):
    """Run an entry script of the repository as a user would, on the CPU (``threads``: default 1 per rank
    under torchrun, else 2)."""
    one = torchrun or os.environ.get("PYTEST_XDIST_WORKER")  # one thread per process where processes share the cores
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(threads or (1 if one else 2))}
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               script, *args]
    else:
        cmd = [sys.executable, script, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-5000:]}")
    return proc


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_nodes(script: str, node_args, timeout: int = 300):
    """Run ``script`` as two torchrun "nodes" of one process each over localhost, node i with
    ``node_args[i]`` (so each node can have its own cache folder, as with per-node disks)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={i}",
                               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                               script, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i, args in enumerate(node_args)]
    outs = [p.communicate(timeout=timeout) for p in procs]
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        if p.returncode != 0:
            raise AssertionError(f"node {i} exited {p.returncode}\nstderr:\n{err[-5000:]}")
    return outs


def write_release_checkpoint(path, lfdn_raw: dict, lfdn_ema: dict, backbone: dict = None, feature_dim: int = 720,
                             epoch: int = 149, alphas_cumprod=None):
    """A checkpoint in the authors' layout, built from docs/METHOD.md §8's key rules (not from our loader)."""
    import argparse

    import numpy as np
    import torch

    betas = np.linspace(0.0015 ** 0.5, 0.0195 ** 0.5, 100) ** 2
    abar = np.cumprod(1 - betas) if alphas_cumprod is None else alphas_cumprod
    abar_prev = np.append(1.0, abar[:-1])
    sd = {
        "betas": betas, "alphas_cumprod": abar, "alphas_cumprod_prev": abar_prev,
        "sqrt_alphas_cumprod": np.sqrt(abar), "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - abar),
        "log_one_minus_alphas_cumprod": np.log(1 - abar), "sqrt_recip_alphas_cumprod": np.sqrt(1 / abar),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1 / abar - 1),
        "posterior_variance": betas * (1 - abar_prev) / (1 - abar),
        "posterior_log_variance_clipped": np.log(np.maximum(betas * (1 - abar_prev) / (1 - abar), 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1 - abar),
        "posterior_mean_coef2": (1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar),
    }
    sd = {k: torch.tensor(v, dtype=torch.float32) for k, v in sd.items()}
    for k, v in lfdn_raw.items():
        sd["model.diffusion_model." + k] = v
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(1234, dtype=torch.int)
    for k, v in lfdn_ema.items():
        sd["model_ema." + ("diffusion_model." + k).replace(".", "")] = v
    sd["cond_stage_model.embedding.weight"] = torch.randn(1, feature_dim)
    for k, v in (backbone or {}).items():
        sd["pretrained_encoder.backbone." + k] = v
    torch.save({"model": sd, "model_ema": None, "optimizer": {"state": {}, "param_groups": []}, "epoch": epoch,
                "scaler": {"scale": 65536.0}, "args": argparse.Namespace(lr=1e-5, batch_size=256, epochs=150)},
               str(path))


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_inprocess(script: str, *args: str, check: bool = True) -> Result:
    """Run an entry script's main() through its error boundary in this process (no interpreter start-up)."""
    import contextlib
    import importlib.util
    import io

    from utils.cli import run_entry

    spec = importlib.util.spec_from_file_location(f"entry_{script[:-3]}", os.path.join(ROOT, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_entry(module.main, list(args))
        except SystemExit as e:
            code = e.code
    result = Result(code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"{script} {' '.join(args)} exited {code}\nstderr:\n{result.stderr[-5000:]}")
    return result
