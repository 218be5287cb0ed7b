"""Training the LFDN on ID features: data order, noise, one epoch, checkpoints, resume.

Reproducibility contract. Everything random is a function of (seed, epoch): the data order
(DistributedSampler seeded with train.seed, ``set_epoch``), the diffusion noise of every optimiser
step's global batch (one generator seeded from (seed, epoch), the same on every rank, drawn once
per optimiser step for all W x b x A rows: micro-batch m takes its W x b rows, rank r rows r::W of
those, matching the sampler's interleaving), and the global torch RNG (seed + rank, re-seeded per
step, for dropout). Hence N ranks with batch b, one process with batch N*b, and one process with
batch b and N accumulation steps all train the same run (to float rounding; with dropout 0), and
a run resumed from a checkpoint equals an uninterrupted one.
"""
import json
import logging
import math
import os
import re
import time
import uuid
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from datasets import ImageSet
from engine.extraction import features_for, loader_for, mode_of, standardized_features, training_set
from engine.factory import build_diffusion, build_extractor, build_lfdn
from errors import Preempted, UserError
from experiment.config import Config, config_to_dict, config_yaml
from experiment.run import check_resume, held_differences
from models.diffusion import GaussianDiffusion
from models.ema import EMA
from models.features import BackboneId, MultiLayerFeatures
from models.lfdn import LFDN
from store.atomic import atomic_link, atomic_write_text
from store.checkpoint import LoadedCheckpoint, check_against, load_checkpoint, make_payload, peek, save_checkpoint
from store.rundir import cause, check_writable, folder_lock, same_file
from utils.distributed import DistContext, all_reduce_mean, barrier, stop_unless_main_agrees
from utils.loader import decoded
from utils.precision import autocast
from utils.preemption import StopRequest, stop_requests
from utils.progress import progress

log = logging.getLogger("dlsr")


class NonFiniteLoss(UserError):
    """The loss became NaN/inf: the run stops before that step touches any weights."""


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 12_345) % (2 ** 63)


def base_lr(cfg: Config, world_size: int) -> float:
    hp = cfg.train
    return hp.lr if hp.lr is not None else hp.blr * hp.batch_size * hp.accum_iter * world_size / 256


def lr_at(cfg: Config, base: float, epoch: float) -> float:
    """Learning rate at fractional epoch ``epoch``: linear warm-up, then constant or half-cosine."""
    hp = cfg.train
    if epoch < hp.warmup_epochs:
        return base * epoch / hp.warmup_epochs
    if not hp.cosine_lr:
        return base
    span = max(hp.epochs - hp.warmup_epochs, 1e-8)
    return hp.min_lr + (base - hp.min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - hp.warmup_epochs) / span))


@dataclass
class Trainer:
    cfg: Config
    ctx: DistContext
    extractor: MultiLayerFeatures
    diffusion: GaussianDiffusion
    model: LFDN                      # unwrapped
    net: torch.nn.Module             # what the step calls: DDP(model) or model
    ema: EMA
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    dataset: Optional[ImageSet]      # None when training on given features
    cached: Optional[torch.Tensor]   # (N, D) standardised features on device, or None for the image path
    start_epoch: int = 0
    run_id: str = ""                 # stored in every checkpoint: test_LR.py refuses pairs from two runs
    start_step: int = 0              # steps of start_epoch done before a stop signal (a resume inside it)
    loss_sum: float = 0.0            # and the sum of their losses, for the epoch's log line
    saves: Optional["SaveClock"] = None

    def __post_init__(self):
        self.saves = self.saves or SaveClock(self.cfg.train.save_overhead)

    def sampler(self, epoch: int) -> DistributedSampler:
        s = DistributedSampler(range(self.num_samples), num_replicas=self.ctx.world_size, rank=self.ctx.rank,
                               shuffle=True, seed=self.cfg.train.seed, drop_last=True)
        s.set_epoch(epoch)
        return s

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[torch.Tensor]:
        """Standardised feature batches (b, D) of this rank, in the epoch's order, batches
        ``start_step`` .. ``steps_per_epoch() - 1``."""
        b, steps = self.cfg.train.batch_size, self.steps_per_epoch()
        order = list(self.sampler(epoch))[start_step * b:steps * b]
        if self.cached is not None:
            idx = torch.tensor(order, dtype=torch.long, device=self.ctx.device)
            for j in range(len(idx) // b):
                yield self.cached[idx[j * b:(j + 1) * b]]
            return
        # The release's way: the frozen backbone runs on every image in every epoch.
        loader = loader_for(self.cfg, self.ctx, self.dataset, b, sampler=order, drop_last=True)
        for images in decoded(loader):
            # The backbone's batch is extract_batch_size, as in extraction: the same speed per image.
            yield standardized_features(self.extractor, images, self.ctx, mode_of(self.cfg, self.ctx),
                                        self.cfg.extract_batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.cached) if self.cached is not None else len(self.dataset)

    def steps_per_epoch(self) -> int:
        """Micro-batches of this rank per epoch: whole accumulations only, as a batch of b x A drops
        its last partial batch (so accumulation trains what the larger batch trains)."""
        accum = self.cfg.train.accum_iter
        return len(self.sampler(0)) // (self.cfg.train.batch_size * accum) * accum

    def train_one_epoch(self, epoch: int, start_step: int = 0, loss_sum: float = 0.0,
                        stop: Optional[StopRequest] = None) -> dict:
        """Steps ``start_step``.. of ``epoch`` (a resume inside an epoch passes the steps done and their
        loss sum). ``stop`` is looked at after every optimiser step, the ranks agreeing on it; a stop
        returns {"epoch", "interrupted": True, "step", "loss_sum"} with the weights after that step."""
        cfg, ctx = self.cfg, self.ctx
        noise = torch.Generator(device=ctx.device)
        noise.manual_seed(epoch_seed(cfg.train.seed, epoch))
        steps, accum = self.steps_per_epoch(), cfg.train.accum_iter
        if steps == 0:
            raise UserError(f"{self.num_samples} training images give no full batch of {cfg.train.batch_size} x "
                            f"{ctx.world_size} process(es) x {accum} accumulation; lower --batch_size")
        base, world, rank = base_lr(cfg, ctx.world_size), ctx.world_size, ctx.rank
        b, dim = cfg.train.batch_size, self.model.in_channels
        rows = world * b * accum  # one optimiser step's global batch

        def draw():  # the noise of one optimiser step: the same draws as one process with batch ``rows``
            return (torch.randint(0, self.diffusion.timesteps, (rows,), generator=noise, device=ctx.device),
                    torch.randn((rows, dim), generator=noise, device=ctx.device))
        for _ in range(start_step // accum):  # the draws of the steps done before a resume, so the next ones match
            draw()
        mode = mode_of(cfg, ctx)
        self.net.train()
        total, lr, start, stop_asked = loss_sum, 0.0, time.perf_counter(), False
        bar = progress(self.batches(epoch, start_step), f"epoch {epoch}", ctx.is_main, total=steps - start_step,
                       unit="step", leave=False)
        for step, z0 in enumerate(bar, start=start_step):  # z0: (b, D)
            # The global RNG (dropout) is seeded per step, so that a run resumed inside an epoch draws the same.
            seed_step(epoch_seed(cfg.train.seed + ctx.rank, epoch) + step, ctx.device)
            micro = step % accum
            if micro == 0:
                lr = lr_at(cfg, base, epoch + step / steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                t_all, eps_all = draw()
            mine = slice(micro * world * b, (micro + 1) * world * b)
            t, eps = t_all[mine][rank::world], eps_all[mine][rank::world]
            last_micro = micro == accum - 1
            sync = nullcontext() if last_micro or not ctx.distributed else self.net.no_sync()
            with sync:
                with autocast(mode):
                    loss = self.diffusion.training_loss(self.net, z0, t, eps)
                # One reduction carries the loss and whether any rank was asked to stop (a flag made
                # on the device, not copied to it). Read back once: the step's only wait for the device.
                flag = loss.detach().new_full((), float(bool(stop)), dtype=torch.float32)
                global_loss, stop_flag = all_reduce_mean(torch.stack([loss.detach().float(), flag]), ctx).tolist()
                stop_asked = stop_flag > 0
                if not math.isfinite(global_loss):
                    raise NonFiniteLoss(f"loss is {global_loss} at epoch {epoch}, step {step}: stopping; "
                                        f"the last checkpoint written is left as it was")
                self.scaler.scale(loss / accum).backward()
            if last_micro:
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.ema.update(self.model)
            total += global_loss
            if ctx.is_main and step % 20 == 0:
                bar.set_postfix(loss=f"{global_loss:.4f}")
            if last_micro and stop_asked and step + 1 < steps:
                return {"epoch": epoch, "interrupted": True, "step": step + 1, "loss_sum": total}
        seconds = time.perf_counter() - start
        return {"epoch": epoch, "loss": total / steps, "lr": lr, "steps": steps, "stop": stop_asked,
                "samples_per_s": (steps - start_step) * b * world / seconds, "seconds": seconds}

    def payload(self, epoch: int, in_progress: Optional[dict] = None) -> dict:
        return make_payload(model=self.model.state_dict(), ema=self.ema.state_dict(),
                            optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(), epoch=epoch,
                            config=config_to_dict(self.cfg), backbone=self.backbone, run_id=self.run_id,
                            in_progress=in_progress, world_size=self.ctx.world_size)

    @property
    def backbone(self) -> BackboneId:
        return self.extractor.backbone_id(self.cfg.backbone.input_size)

    def save(self, epoch: int, last: bool = False) -> list:
        """After ``epoch``: checkpoint-<epoch>.pth every save_every epochs (epoch 0 included), and
        checkpoint-last.pth with it, at the end, and after every other epoch while refreshing it
        costs at most ``train.save_overhead`` of the time (``refresh_due``), or when ``last`` asks for
        it (a stop). Rank 0 writes, everyone waits."""
        cfg = self.cfg
        names = []
        if epoch % cfg.train.save_every == 0:
            names.append(f"checkpoint-{epoch}.pth")
        if names or last or epoch + 1 == cfg.train.epochs or (self.ctx.is_main and self.saves.refresh_due()):
            names.append("checkpoint-last.pth")
        if self.ctx.is_main and names:
            self._write(self.payload(epoch), names)
        barrier(self.ctx)
        return names

    def save_stopped(self, stats: dict) -> str:
        """checkpoint-last.pth inside epoch ``stats["epoch"]`` after ``stats["step"]`` steps (a stop signal)."""
        if self.ctx.is_main:
            self._write(self.payload(stats["epoch"], {"step": stats["step"], "loss_sum": stats["loss_sum"]}),
                        ["checkpoint-last.pth"])
        barrier(self.ctx)
        return os.path.join(self.cfg.output_dir, "checkpoint-last.pth")

    def _write(self, payload: dict, names: list) -> None:
        first = os.path.join(self.cfg.output_dir, names[0])
        try:
            with self.saves.timed():
                save_checkpoint(payload, first)
                for name in names[1:]:
                    atomic_link(first, os.path.join(self.cfg.output_dir, name))
        except OSError as e:
            raise UserError(f"cannot write checkpoint {first!r}: {cause(e)}; the checkpoints written "
                            f"before are left as they were") from None


class SaveClock:
    """When to refresh checkpoint-last.pth: while the last write took at most ``overhead`` of the
    time since the write before it ended. An 86.7M LFDN's checkpoint (model, EMA, AdamW moments)
    is about 1.4 GB; next to long epochs it is written after each one, next to short ones every
    few epochs, so that saving never costs more than ``overhead`` of the run."""

    def __init__(self, overhead: float, clock=time.perf_counter):
        self.overhead, self.clock = overhead, clock
        self.last_end, self.last_seconds = clock(), 0.0

    def refresh_due(self) -> bool:
        return self.overhead >= 1 or self.last_seconds <= self.overhead * (self.clock() - self.last_end)

    @contextmanager
    def timed(self):
        start = self.clock()
        yield
        self.last_end = self.clock()
        self.last_seconds = self.last_end - start


def seed_step(seed: int, device: torch.device) -> None:
    """Seed the generators a training step draws from (dropout): the CPU's and, on a GPU, that GPU's.
    The same seeds torch.manual_seed sets for them, without its cost on a machine where CUDA is not
    initialised: it queues the seed for each backend it could not reach with a formatted stack, ~5 ms
    a call, as long as a small step."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index].manual_seed(seed)


def build_trainer(cfg: Config, ctx: DistContext, resume: Optional[str] = None, init_from: Optional[str] = None,
                  features: Optional[torch.Tensor] = None,
                  extractor: Optional[MultiLayerFeatures] = None) -> Trainer:
    """In three steps: the training data and its features, the model and its optimiser, then the
    state restored from ``resume`` / ``init_from``. ``features`` (N, D) standardised vectors train
    directly, with no dataset (the Python API's ``fit_features``)."""
    torch.manual_seed(cfg.train.seed + ctx.rank)
    resumed = load_checkpoint(resume) if resume else None
    initial = load_checkpoint(init_from) if init_from else None
    if resumed is not None:
        check_resume(cfg, ctx.world_size, resumed)  # before any work
        check_complete(cfg, resumed)
    if extractor is None:
        backbone_state = initial.backbone_state if initial is not None else None
        extractor = build_extractor(cfg, backbone_state)
    extractor = extractor.to(ctx.device)
    diffusion = build_diffusion(cfg)
    for ck in (resumed, initial):
        if ck is not None:
            check_against(ck, backbone=extractor.backbone_id(cfg.backbone.input_size), diffusion=diffusion,
                          config_source="the config")
    dataset, cached = training_data(cfg, ctx, extractor, features)
    model, ema, optimizer, scaler = training_model(cfg, ctx, extractor.feature_dim, initial)
    start_epoch, start_step, loss_sum = restore(cfg, model, ema, optimizer, scaler, resumed)
    run_id = resumed.run_id if resumed is not None and resumed.run_id else uuid.uuid4().hex
    net = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.cuda else None) \
        if ctx.distributed else model
    return Trainer(cfg, ctx, extractor, diffusion, model, net, ema, optimizer, scaler, dataset, cached, start_epoch,
                   run_id, start_step, loss_sum)


def check_complete(cfg: Config, ck: LoadedCheckpoint) -> None:
    """RunComplete when ``ck`` holds the last epoch ``cfg`` asks for (or a later one)."""
    why = completion(cfg, ck.path, ck.epoch, ck.in_progress)
    if why:
        raise RunComplete(why)


def completion(cfg: Config, path: str, epoch: Optional[int], in_progress) -> Optional[str]:
    """The line saying that the run whose checkpoint ``path`` holds ``epoch`` (``in_progress``: saved
    inside it) is complete for ``cfg``; None when ``cfg`` asks for more (or the save is mid-epoch)."""
    if in_progress or epoch is None or epoch + 1 < cfg.train.epochs:
        return None
    return (f"{path} holds epoch {epoch} of a run of {epoch + 1} epoch(s): the run is "
            f"complete{'' if epoch + 1 == cfg.train.epochs else f' (--epochs {cfg.train.epochs} asks for fewer)'}; "
            f"nothing to train (--epochs N with N > {epoch + 1} continues it)")


class RunComplete(Exception):
    """--resume of a run that has already trained every epoch asked for: nothing to do (exit 0)."""


def training_data(cfg: Config, ctx: DistContext, extractor: MultiLayerFeatures,
                  features: Optional[torch.Tensor] = None):
    """(the ID training set or None, its standardised features (N, D) on the device or None for the image path)."""
    if features is not None:
        if features.dim() != 2 or features.shape[1] != extractor.feature_dim:
            raise UserError(f"training features must be (N, {extractor.feature_dim}), got {tuple(features.shape)}")
        return None, features.to(ctx.device, torch.float32)
    dataset = training_set(cfg)
    if not cfg.train.cache_features:
        return dataset, None
    feats = features_for(cfg, ctx, extractor, dataset, "train", "extracting train features")
    if ctx.is_main:
        log.info("train features: %d x %d (%s)", *feats.z.shape,
                 "from cache" if feats.from_cache else f"extracted in {feats.seconds:.1f}s")
    return dataset, feats.z  # (N, D)


def training_model(cfg: Config, ctx: DistContext, feature_dim: int, initial: Optional[LoadedCheckpoint]):
    """A fresh LFDN (or ``initial``'s weights), its EMA, the AdamW optimiser and the grad scaler."""
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_lfdn(cfg, feature_dim).to(ctx.device)
    hp = cfg.train
    # Fused on CUDA: the grad scaler then hands the step its inf check on the device instead of
    # reading it back (one device read per step, not two).
    optimizer = torch.optim.AdamW(model.parameters(), lr=base_lr(cfg, ctx.world_size), weight_decay=hp.weight_decay,
                                  betas=tuple(hp.betas), fused=True if ctx.cuda else None)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and ctx.cuda)
    if initial is not None:
        _load_weights(model, initial, "--pre_ckpt_path")
    return model, EMA(model, hp.ema_decay), optimizer, scaler


def restore(cfg: Config, model: LFDN, ema: EMA, optimizer, scaler, resumed: Optional[LoadedCheckpoint]):
    """Load a run's state from its checkpoint; return (the epoch to start from, the steps of it already
    done, their loss sum): (epoch + 1, 0, 0) after a finished epoch, (epoch, step, sum) inside one."""
    if resumed is None:
        return 0, 0, 0.0
    _load_weights(model, resumed, "--resume")
    if resumed.ema is not None:
        ema.load_state_dict(resumed.ema)
    optimizer.load_state_dict(resumed.optimizer)
    for group in optimizer.param_groups:  # the config given now wins over the saved hyperparameters
        group["weight_decay"], group["betas"] = cfg.train.weight_decay, tuple(cfg.train.betas)
    if resumed.scaler:
        scaler.load_state_dict(resumed.scaler)
    if resumed.in_progress:
        return resumed.epoch, int(resumed.in_progress["step"]), float(resumed.in_progress["loss_sum"])
    return resumed.epoch + 1, 0, 0.0


def _load_weights(model: LFDN, ckpt: LoadedCheckpoint, flag: str) -> None:
    try:
        model.load_state_dict(ckpt.model)
    except RuntimeError as e:
        raise UserError(f"{ckpt.path} ({flag}) does not fit the LFDN of this config: "
                        f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}") from None


def train(cfg: Config, ctx: DistContext, resume: Optional[str] = None, init_from: Optional[str] = None,
          features: Optional[torch.Tensor] = None, extractor: Optional[MultiLayerFeatures] = None,
          overwrite: bool = False, output_dir_given: bool = True) -> Optional[Trainer]:
    """The whole run: find the run's folder (``locate_run``), check and lock it and the log folder,
    build, then epochs from ``start_epoch``; returns the trainer at the end (None when ``resume``
    names a run that is already complete). ``resume``: a checkpoint, "auto" (the output folder's
    own run, if any), or None (a new run)."""
    problem = _flag_problem(resume, overwrite, init_from)  # the same on every rank: no agreement needed
    if problem:
        raise UserError(problem)
    resume = locate_run(cfg, ctx, resume, output_dir_given)
    stop_unless_main_agrees(lambda: _output_problem(cfg, resume, overwrite, init_from), ctx)
    with ExitStack() as held:
        if ctx.is_main:
            for folder in run_folders(cfg):
                held.enter_context(folder_lock(os.path.join(folder, ".lock"), f"{_what(cfg, folder)} {folder!r}"))
            if overwrite and resume is None:
                _delete_run_files(cfg)
        # Caught from here on: a stop during the feature extraction takes effect at the first step
        # (the extracted features are stored first), not as a kill that loses them.
        with stop_requests() as stop:
            try:
                trainer = build_trainer(cfg, ctx, resume, init_from, features, extractor)
            except RunComplete as e:
                if ctx.is_main:
                    log.info("%s", e)
                return None
            _run_epochs(trainer, stop)
    return trainer


CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+|last)\.pth")
AUTO = "auto"


def run_folders(cfg: Config) -> list:
    """The folders a run owns: its output folder, and its log folder where that is another one."""
    folders = [cfg.output_dir]
    if not same_file(cfg.log_folder, cfg.output_dir):
        folders.append(cfg.log_folder)
    return folders


def _what(cfg: Config, folder: str) -> str:
    return "output folder" if folder == cfg.output_dir else "log folder"


def checkpoints_in(folder: str) -> list:
    """The checkpoint files in ``folder``, sorted by name."""
    return sorted(n for n in os.listdir(folder) if CHECKPOINT_NAME.fullmatch(n)) if os.path.isdir(folder) else []


def folder_run_id(folder: str) -> Optional[str]:
    """The id of the run whose checkpoints ``folder`` holds (its newest checkpoint's), None if none."""
    names = checkpoints_in(folder)
    if not names:
        return None
    newest = max(names, key=lambda n: os.path.getmtime(os.path.join(folder, n)))
    return (peek(os.path.join(folder, newest)) or {}).get("run_id")


def locate_run(cfg: Config, ctx: DistContext, resume: Optional[str], output_dir_given: bool) -> Optional[str]:
    """The checkpoint to resume from (None: a new run), with ``cfg.output_dir`` set to the run's folder.

    ``resume`` "auto": the output folder's checkpoint-last.pth when the folder holds a run, a new run
    when it holds none. A checkpoint path: the run continues in the folder the checkpoint is in, unless
    --output_dir names another (``output_dir_given``), which must then hold no run or this one
    (checked in ``_output_problem``). One line says where the run continues. Rank 0 decides."""
    if resume is None:
        return None
    if resume == AUTO:
        last = os.path.join(cfg.output_dir, "checkpoint-last.pth")
        found = bool(checkpoints_in(cfg.output_dir))
        held = peek(last)
        if held is not None:
            diffs = held_differences(cfg, ctx.world_size, held)
            if diffs:
                raise UserError(f"--resume auto: output folder {cfg.output_dir!r} holds another run ({'; '.join(diffs)}); "
                                f"choose another --output_dir, or start afresh there with --overwrite instead of "
                                f"--resume")
        if ctx.is_main:
            log.info("--resume auto: %s", f"continuing the run in {cfg.output_dir}" if found else
                     f"{cfg.output_dir} holds no run: starting a new one")
        return last if found else None
    folder = os.path.dirname(os.path.abspath(resume))
    if not output_dir_given and not same_file(folder, cfg.output_dir):
        if ctx.is_main:
            log.info("continuing the run in %s, where its checkpoint is (the config names %s; --output_dir "
                     "chooses another folder)", folder, cfg.output_dir)
        cfg.output_dir = folder
    return resume


def _flag_problem(resume: Optional[str], overwrite: bool, init_from: Optional[str]) -> Optional[str]:
    if resume and overwrite:
        return "--resume continues a run and --overwrite deletes it to start afresh: give one of them"
    if resume and init_from:
        return ("--resume continues a run from its own weights and --pre_ckpt_path starts a new run from other "
                "weights: give one of them")
    return None


def _output_problem(cfg: Config, resume: Optional[str], overwrite: bool,
                    init_from: Optional[str] = None) -> Optional[str]:
    """Why rank 0 may not train into cfg.output_dir and its log folder (None if it may), checked
    before any work: one folder, one run."""
    try:
        for folder, what in ((cfg.output_dir, "output folder"), (cfg.log_folder, "log folder"),
                             (cfg.feature_cache_dir, "feature cache folder")):
            check_writable(folder, what)
    except UserError as e:
        return str(e)
    existing = checkpoints_in(cfg.output_dir)
    if overwrite and init_from and any(same_file(init_from, os.path.join(cfg.output_dir, n)) for n in existing):
        return (f"--pre_ckpt_path {init_from!r} is one of the checkpoints that --overwrite deletes in "
                f"{cfg.output_dir!r}; copy it elsewhere first, or train into another --output_dir")
    if resume is None:
        if existing and not overwrite:
            return (f"output folder {cfg.output_dir!r} already holds checkpoints of a run ({', '.join(existing[:3])}"
                    f"{', ...' if len(existing) > 3 else ''}); continue it with --resume "
                    f"{os.path.join(cfg.output_dir, 'checkpoint-last.pth')} (or --resume auto), start afresh with "
                    f"--overwrite, or choose another --output_dir")
        return None if overwrite else _log_problem(cfg, None)
    if not os.path.isfile(resume):
        if existing:
            return (f"--resume auto: output folder {cfg.output_dir!r} holds checkpoints ({', '.join(existing[:3])}) "
                    f"but no checkpoint-last.pth; resume from one of them with --resume PATH")
        return None  # load_checkpoint names what is missing
    ours = (peek(resume) or {}).get("run_id")
    theirs = folder_run_id(cfg.output_dir)
    if theirs is not None and ours is not None and theirs != ours:
        return (f"output folder {cfg.output_dir!r} holds another run (run {theirs[:8]}) than {resume} (run "
                f"{ours[:8]}): one folder, one run; resume into the checkpoint's own folder or an empty one")
    return _log_problem(cfg, ours)


def log_run_ids(path: str) -> set:
    """The run ids named by the lines of a log.txt (lines of older versions name none)."""
    ids = set()
    if os.path.isfile(path):
        with open(path, errors="replace") as f:
            for line in f:
                try:
                    ids.add(json.loads(line)["run_id"])
                except (ValueError, KeyError, TypeError):
                    pass
    return ids


def _log_problem(cfg: Config, run_id: Optional[str]) -> Optional[str]:
    """Why the log folder may not take this run's log (None if it may): it holds another run's log.txt."""
    others = log_run_ids(os.path.join(cfg.log_folder, "log.txt")) - {run_id}
    if others:
        return (f"log folder {cfg.log_folder!r} holds the log of another run (run {sorted(others)[0][:8]}): one "
                f"folder, one run; choose another --log_dir, or --overwrite to start afresh there")
    return None


def _delete_run_files(cfg: Config) -> None:
    """--overwrite: the checkpoints of the output folder and the log of the log folder go."""
    for folder in run_folders(cfg):
        for name in os.listdir(folder):
            if CHECKPOINT_NAME.fullmatch(name) or name in ("log.txt", "config.yaml"):
                os.remove(os.path.join(folder, name))


def _run_epochs(trainer: Trainer, stop: StopRequest) -> None:
    cfg, ctx = trainer.cfg, trainer.ctx
    log_txt = os.path.join(cfg.log_folder, "log.txt")
    if ctx.is_main:
        atomic_write_text(os.path.join(cfg.log_folder, "config.yaml"), config_yaml(cfg))
        keep_log_before(log_txt, trainer.start_epoch)
        log.info("LFDN %.2fM parameters; %d images, %d steps/epoch on %d process(es); epochs %d..%d%s",
                 sum(p.numel() for p in trainer.model.parameters()) / 1e6, trainer.num_samples,
                 trainer.steps_per_epoch(), ctx.world_size, trainer.start_epoch, cfg.train.epochs - 1,
                 f" (epoch {trainer.start_epoch} from step {trainer.start_step})" if trainer.start_step else "")
    writer = _tensorboard(cfg.log_folder) if ctx.is_main else None
    epochs = progress(range(trainer.start_epoch, cfg.train.epochs), "training", ctx.is_main, unit="epoch")
    start_step, loss_sum = trainer.start_step, trainer.loss_sum
    try:
        for epoch in epochs:
            stats = trainer.train_one_epoch(epoch, start_step, loss_sum, stop)
            start_step, loss_sum = 0, 0.0
            if stats.get("interrupted"):
                path = trainer.save_stopped(stats)
                raise Preempted(f"{stop.name or 'a stop signal'} received: {path} holds epoch {epoch} up to "
                                f"step {stats['step']} of {trainer.steps_per_epoch()}; continue the run with the "
                                f"same command and --resume {path}")
            stopping = stats.pop("stop", False)  # asked at the epoch's last step: the epoch ends first
            saved = trainer.save(epoch, last=stopping)
            if ctx.is_main:
                epochs.set_postfix(loss=f"{stats['loss']:.4f}")
                with open(log_txt, "a") as f:
                    f.write(json.dumps({**stats, "saved": saved, "run_id": trainer.run_id}) + "\n")
                if writer is not None:
                    writer.add_scalar("train/loss", stats["loss"], epoch)
                    writer.add_scalar("train/lr", stats["lr"], epoch)
            if stopping and epoch + 1 < cfg.train.epochs:
                path = os.path.join(cfg.output_dir, "checkpoint-last.pth")
                raise Preempted(f"{stop.name or 'a stop signal'} received: {path} holds epoch {epoch} (complete); "
                                f"continue the run with the same command and --resume {path}")
    finally:
        if writer is not None:
            writer.close()


def keep_log_before(path: str, epoch: int) -> None:
    """Drop the lines of epochs >= ``epoch`` from log.txt: a resumed run writes them again."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["epoch"] < epoch:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            kept.append(line)  # not ours: left alone
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(kept))


def _tensorboard(log_dir: str):
    try:  # optional: TensorBoard events only where tensorboard is installed
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=log_dir)
