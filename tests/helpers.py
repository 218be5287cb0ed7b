"""Shared by the tests: a tiny config on disk, runners for the real entry scripts, and helpers
several test files use."""
import contextlib
import csv
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from sklearn.datasets import load_digits

from datasets.torchvision_sets import DEBIAN_FASHION_MNIST
from utils.distributed import DistContext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The tiny config's ID test set: the first 453 of scikit-learn's digits (7 evaluation batches of 64,
# then 5 images), so each evaluation runs the backbone on 853 images, not 2,197.
EVAL_DIGITS = 453


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
        "eval": {"dataset": f"digits:{EVAL_DIGITS}", "ood": {"gauss": "noise:gaussian:200", "photos": "photos:200"},
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


def run_script(script: str, *args: str, torchrun: int = 0, check: bool = True, timeout: int = 300, threads: int = 0,
               env: dict = None):
    """Run an entry script of the repository as a user would, on the CPU (``threads``: default 1 per rank
    under torchrun, else 2; ``env``: variables added to the environment)."""
    one = torchrun or os.environ.get("PYTEST_XDIST_WORKER")  # one thread per process where processes share the cores
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(threads or (1 if one else 2)), **(env or {})}
    if torchrun:
        cmd = [sys.executable, "-m", "tools.torchrun", "--standalone", f"--nproc_per_node={torchrun}",
               script, *args]
    else:
        cmd = [sys.executable, script, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-5000:]}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_forked_ranks(script: str, rank_args, per_node: int = None, record: str = None, timeout: int = 300,
                     check: bool = True) -> list:
    """Run ``script``'s main() as len(rank_args) gloo ranks forked from this process, rank r with
    ``rank_args[r]`` and the variables torchrun gives a rank (RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT); ``per_node`` ranks a node (default: all on one,
    1: each rank its own node). torch and the library are already imported here, so a rank starts
    in milliseconds instead of the seconds an interpreter and torchrun's agent take; the ranks run
    the same code as under torchrun (tests that need the launcher itself use tools.torchrun).
    ``record``: each rank's collectives appended to RECORD.rank<r> (tests/record_collectives).
    Returns [Result] in rank order."""
    return start_forked_ranks(script, rank_args, per_node, record).wait(timeout, check)


def start_forked_ranks(script: str, rank_args, per_node: int = None, record: str = None) -> "Forked":
    """``run_forked_ranks`` without waiting: the ranks run while the caller watches them (``.pids``,
    in rank order, to signal one) and then ``.wait()`` s for them."""
    world = len(rank_args)
    per_node = per_node or world
    port = str(free_port())
    envs = [dict(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r % per_node), LOCAL_WORLD_SIZE=str(per_node),
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **({"RECORD_COLLECTIVES": record} if record else {}))
            for r in range(world)]
    return Forked(script, rank_args, envs)


def run_forked(script: str, *args: str, check: bool = True, timeout: int = 300) -> "Result":
    """Run ``script``'s main() in one process forked from this one: another process (for a lock this
    one holds), without an interpreter's start-up."""
    return Forked(script, [args], [{}]).wait(timeout, check)[0]


class Forked:
    """Processes forked from this one, process n running ``script``'s main() with ``arg_lists[n]``
    and the variables ``envs[n]`` added; each one's stdout and stderr go to a file."""

    def __init__(self, script: str, arg_lists, envs):
        import signal
        import tempfile
        self.script = script
        self.folder = tempfile.mkdtemp(prefix="forked-")
        self.pids, self.codes = [], {}
        for n, (args, env) in enumerate(zip(arg_lists, envs)):
            pid = os.fork()
            if pid == 0:  # the child: never returns
                code = 1
                try:
                    for fd, name in ((1, "out"), (2, "err")):
                        os.dup2(os.open(os.path.join(self.folder, f"{n}.{name}"), os.O_WRONLY | os.O_CREAT), fd)
                    sys.stdout = open(1, "w", buffering=1, closefd=False)
                    sys.stderr = open(2, "w", buffering=1, closefd=False)
                    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
                        signal.signal(sig, signal.SIG_DFL)
                    signal.signal(signal.SIGINT, signal.default_int_handler)
                    torch.set_num_threads(1)  # one thread a process, as OMP_NUM_THREADS=1 gives a launched rank
                    os.environ.update(CUDA_VISIBLE_DEVICES="", **env)
                    if "RECORD_COLLECTIVES" in env:
                        import runpy
                        runpy.run_path(os.path.join(RECORDER, "sitecustomize.py"))
                    code = run_inprocess(script, *args, check=False, capture=False).returncode or 0
                except BaseException:
                    import traceback
                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code if isinstance(code, int) else 1)
            self.pids.append(pid)

    def until(self, ready, timeout: int = 120) -> None:
        """Poll ``ready()`` until it holds. If a process ends first, or ``timeout`` seconds pass, the
        others are killed (none outlives the test) and an AssertionError says which happened."""
        import time
        start = time.time()
        while not ready():
            ended = self._reap() > 0
            if ended or time.time() - start > timeout:
                self._kill_the_rest()
                raise AssertionError(f"{self.script}: " + ("a process ended before it was ready" if ended else
                                                           f"not ready after {timeout} s"))
            time.sleep(0.05)

    def _reap(self) -> int:
        """Record the exit status of every process that has ended; how many have."""
        for pid in self.pids:
            if pid not in self.codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    self.codes[pid] = os.waitstatus_to_exitcode(status)
        return len(self.codes)

    def _kill_the_rest(self) -> None:
        import signal
        for pid in self.pids:
            if pid not in self.codes:
                os.kill(pid, signal.SIGKILL)
                self.codes[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    def wait(self, timeout: int = 300, check: bool = True) -> list:
        """[Result] in process order, once every process has ended; ``check``: an AssertionError
        naming the first process that exited other than 0."""
        import shutil
        import time
        deadline = time.time() + timeout
        while self._reap() < len(self.pids):
            if time.time() > deadline:
                self._kill_the_rest()
                raise AssertionError(f"{self.script}: ran past {timeout} s")
            time.sleep(0.01)
        results = []
        for n, pid in enumerate(self.pids):
            out, err = (open(os.path.join(self.folder, f"{n}.{name}"), errors="replace").read()
                        for name in ("out", "err"))
            results.append(Result(self.codes[pid], out, err))
        shutil.rmtree(self.folder, ignore_errors=True)
        for n, r in enumerate(results):
            if check and r.returncode != 0:
                raise AssertionError(f"{self.script} (process {n}) exited {r.returncode}\nstderr:\n{r.stderr[-5000:]}")
        return results


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


def run_inprocess(script: str, *args: str, check: bool = True, capture: bool = True) -> Result:
    """Run an entry script's main() through its error boundary in this process (no interpreter start-up);
    ``capture=False`` leaves stdout and stderr where they are (the Result's are then empty)."""
    import contextlib
    import importlib.util
    import io

    from cli import run_entry

    spec = importlib.util.spec_from_file_location(f"entry_{script[:-3]}", os.path.join(ROOT, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, err, code = io.StringIO(), io.StringIO(), 0
    with (contextlib.redirect_stdout(out) if capture else contextlib.nullcontext()), \
            (contextlib.redirect_stderr(err) if capture else contextlib.nullcontext()):
        try:
            run_entry(module.main, list(args))
        except SystemExit as e:
            code = e.code
    result = Result(code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"{script} {' '.join(args)} exited {code}\nstderr:\n{result.stderr[-5000:]}")
    return result


# ---------------------------------------------------------------- shared by several test files


def brute_knn(train, test, k):
    tr = train / np.linalg.norm(train, axis=1, keepdims=True)
    te = test / np.linalg.norm(test, axis=1, keepdims=True)
    d = np.sqrt(((te[:, None, :] - tr[None, :, :]) ** 2).sum(-1))  # (M, N) Euclidean
    return np.sort(d, axis=1)[:, k - 1]


def save_images(folder, n, size=(20, 30), start=0):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(start)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(os.path.join(folder, f"{start + i:03d}.png"))


needs_fmnist = pytest.mark.skipif(not os.path.isdir(DEBIAN_FASHION_MNIST),
                                  reason="Debian's dataset-fashion-mnist is not installed")


def digits_uint8():
    return np.round(load_digits().images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)


def evaluate(t, out, *extra, script="test_mse_mfsim.py", check=True, forked=False):
    """Run an evaluation script in this process (plots off), or with plots in a ``forked`` process."""
    if script == "test_mse_mfsim.py":
        ckpt = ["--pretrained_ldm_ckpt", str(t.ckpt / "checkpoint-last.pth")]
    else:
        ckpt = ["--pretrained_ldm_ckpt_first", str(t.ckpt / "checkpoint-0.pth"),
                "--pretrained_ldm_ckpt_end", str(t.ckpt / "checkpoint-last.pth")]
    args = [*ckpt, "--pretrained_ldm_cfg", t.config, "--evaluate", "--output_dir", str(out), *extra]
    if forked:
        return run_forked(script, *args, check=check)
    return run_inprocess(script, *args, "--no_plots", check=check)


def error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return proc.stderr.strip().splitlines()[-1]


def try_evaluate(t, out, *extra, check=False, script="test_mse_mfsim.py"):
    ckpt = (["--pretrained_ldm_ckpt", str(t.ckpt / "checkpoint-last.pth")] if script == "test_mse_mfsim.py" else [])
    return run_inprocess(script, *ckpt, "--pretrained_ldm_cfg", t.config, "--output_dir", str(out), "--no_plots",
                         *extra, check=check)


def snapshot(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


FAKE_GPU = torch.device("meta")


CPU = DistContext(0, 1, 0, torch.device("cpu"))


def last(proc):
    return proc.stderr.strip().splitlines()[-1]


SIDE = 16  # every miniature image is 16 x 16 RGB, so that pytorch-ood's loaders can batch them


PRESET = os.path.join(ROOT, "config", "openood_cifar10.yaml")


def _save(img: np.ndarray, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(img).resize((SIDE, SIDE), Image.BILINEAR).save(path)


def make_openood_root(root) -> dict:
    """A miniature OpenOOD root: benchmark_imglist/cifar10/*.txt and images_classic/...; returns
    {list name: [relative paths]}."""
    from sklearn.datasets import load_digits, load_sample_images
    digits = load_digits()
    gray = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    rgb = lambda a: np.repeat(a[..., None], 3, -1)  # noqa: E731
    rng = np.random.default_rng(0)
    photos = load_sample_images().images
    lists = {}

    def add(list_name, rel_dir, images, labels):
        rels = []
        for i, (img, label) in enumerate(zip(images, labels)):
            rel = f"{rel_dir}/{label if label >= 0 else 'x'}/{i:04d}.png"
            _save(img, os.path.join(root, "images_classic", rel))
            rels.append((rel, label))
        lists[list_name] = rels

    low = np.flatnonzero(digits.target < 5)
    high = np.flatnonzero(digits.target >= 5)
    add("train_cifar10", "cifar10/train", [rgb(gray[i]) for i in low[:200]], digits.target[low[:200]])
    add("val_cifar10", "cifar10/val", [rgb(gray[i]) for i in low[200:240]], digits.target[low[200:240]])
    add("test_cifar10", "cifar10/test", [rgb(gray[i]) for i in low[240:340]], digits.target[low[240:340]])
    add("test_cifar100", "cifar100/test", [rgb(gray[i]) for i in high[:60]], [-1] * 60)
    add("test_tin", "tin/test", list(rng.integers(0, 256, (40, SIDE, SIDE, 3), dtype=np.uint8)), [-1] * 40)
    add("val_tin", "tin/val", list(rng.integers(0, 256, (30, SIDE, SIDE, 3), dtype=np.uint8)), [-1] * 30)
    add("test_mnist", "mnist/test", [rgb(255 - gray[i]) for i in high[60:100]], [-1] * 40)
    add("test_svhn", "svhn/test", [np.clip(rng.normal(128, 60, (SIDE, SIDE, 3)), 0, 255).astype(np.uint8)
                                   for _ in range(30)], [-1] * 30)
    crops = [photos[k][y:y + 64, x:x + 64] for k in (0, 1) for y in range(0, 256, 64) for x in range(0, 256, 64)]
    add("test_texture", "texture/test", crops[:16], [-1] * 16)
    add("test_places365", "places365/test", crops[16:], [-1] * 16)
    folder = os.path.join(root, "benchmark_imglist", "cifar10")
    os.makedirs(folder, exist_ok=True)
    for name, rels in lists.items():
        with open(os.path.join(folder, f"{name}.txt"), "w") as f:
            f.writelines(f"{rel} {label}\n" for rel, label in rels)
    return lists


def save_digits(folder, indices):
    os.makedirs(folder, exist_ok=True)
    images = load_digits().images
    for i in indices:
        Image.fromarray(np.round(images[i] * (255.0 / 16.0)).astype(np.uint8)).save(os.path.join(folder, f"d{i:04d}.png"))


def predict(t, output, *paths, extra=()):
    proc = run_inprocess("predict.py", "--checkpoint", str(t.ckpt / "checkpoint-last.pth"), "--images", *map(str, paths),
                         "--output", str(output), *extra)
    with open(output) as f:
        rows = list(csv.DictReader(f))
    return proc, rows


def _digit_png(path, bits=8):
    img = np.round(load_digits().images[5] * (255.0 / 16.0)).astype(np.uint8)
    if bits == 16:
        Image.fromarray(img.astype(np.uint16) * 256 + 100).save(path)  # high byte = the 8-bit image
    else:
        Image.fromarray(img).save(path)
    return img



RECORDER = os.path.join(ROOT, "tests", "record_collectives")  # sitecustomize.py: test instrumentation


def recording_env(stem: str) -> dict:
    """The variables under which every rank records its collectives to STEM.rank<r>."""
    path = os.pathsep.join(p for p in (RECORDER, os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "RECORD_COLLECTIVES": stem}


def collective_sequences(stem: str) -> list:
    import glob
    return [open(f).read().splitlines() for f in sorted(glob.glob(glob.escape(stem) + ".rank*"))]


def run_recorded(tmp_path, name: str, script: str, *args: str, ranks: int = 2, check: bool = True):
    """Run ``script`` on ``ranks`` forked ranks with every collective recorded; return the sequence the
    ranks issued, after asserting that it is the same on every rank."""
    stem = str(tmp_path / f"{name}.collectives")
    err = run_forked_ranks(script, [args] * ranks, record=stem, check=check)[0].stderr
    seqs = collective_sequences(stem)
    assert len(seqs) == ranks and seqs[0], f"no collectives recorded: {err[-2000:]}"
    assert all(s == seqs[0] for s in seqs), "the ranks issued different collectives"
    return seqs[0]


LIBRARY_FOLDERS = ("cli.py", "errors.py", "main.py", "predict.py", "test_LR.py", "test_mse_mfsim.py",
                   "submitit_train.py", "dlsr", "engine", "experiment", "models", "datasets", "scoring", "store",
                   "utils", "tools")


def library_files() -> list:
    """Every Python file of the library (all but tests/ and bench/)."""
    import glob
    out = []
    for entry in LIBRARY_FOLDERS:
        path = os.path.join(ROOT, entry)
        if entry.endswith(".py"):
            out += [path] if os.path.isfile(path) else []
        else:
            out += sorted(glob.glob(os.path.join(path, "**", "*.py"), recursive=True))
    return out


def scorer_for(cfg, ctx, paths: dict):
    """A Scorer of the checkpoints ``paths`` ({role: path}) under ``cfg``, as the scripts build one."""
    from engine.scorer import Scorer
    from experiment.run import run_config
    from store.checkpoint import load_checkpoint
    return Scorer.from_checkpoints(run_config({role: load_checkpoint(str(p)) for role, p in paths.items()}, cfg), ctx)


@contextlib.contextmanager
def hold_lock(path):
    """For the block, another process holds the lock file ``path`` (as a second run would), its pid
    written as 4242."""
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.lockf(fd, fcntl.LOCK_EX); os.ftruncate(fd, 0); os.write(fd, b'4242'); print('locked', flush=True); "
            "time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


class Exploit:
    """Pickled, it runs ``touch marker`` when loaded: a file that asks to run code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
