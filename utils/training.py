"""Training the LFDN on ID features: data order, noise, one epoch, checkpoints, resume.

Reproducibility contract. Everything random is a function of (seed, epoch): the data order
(DistributedSampler seeded with train.seed, ``set_epoch``), the diffusion noise of every global
batch (one generator seeded from (seed, epoch), the same on every rank; rank r takes rows r::W,
matching the sampler's interleaving), and the global torch RNG (seed + rank, re-seeded per
epoch, for dropout). Hence N ranks with batch b equal one process with batch N*b, and a run
resumed from a checkpoint (saved at an epoch boundary) equals an uninterrupted one.
"""
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from datasets import ImageSet, build_dataset, random_subset
from models.diffusion import GaussianDiffusion
from models.ema import EMA
from models.features import MultiLayerFeatures, standardize
from models.lfdn import LFDN
from utils.atomic import atomic_link
from utils.checkpoint import (
    LoadedCheckpoint,
    check_against,
    load_checkpoint,
    make_payload,
    save_checkpoint,
)
from utils.config import Config, config_to_dict, save_config
from utils.distributed import DistContext, all_reduce_mean, barrier
from utils.errors import UserError
from utils.features import autocast, backbone_features, image_loader, load_or_extract
from utils.model_factory import build_diffusion, build_lfdn
from utils.progress import progress

log = logging.getLogger("dlsr")


class NonFiniteLoss(UserError):
    """The loss became NaN/inf: the run stops before that step touches any weights."""


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 12_345) % (2 ** 63)


def base_lr(cfg: Config, world_size: int) -> float:
    t = cfg.train
    return t.lr if t.lr is not None else t.blr * t.batch_size * t.accum_iter * world_size / 256


def lr_at(cfg: Config, base: float, progress: float) -> float:
    """Learning rate at fractional epoch ``progress``: linear warm-up, then constant or half-cosine."""
    t = cfg.train
    if progress < t.warmup_epochs:
        return base * progress / t.warmup_epochs
    if not t.cosine_lr:
        return base
    span = max(t.epochs - t.warmup_epochs, 1e-8)
    return t.min_lr + (base - t.min_lr) * 0.5 * (1.0 + math.cos(math.pi * (progress - t.warmup_epochs) / span))


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
    dataset: ImageSet
    cached: Optional[torch.Tensor]   # (N, D) standardised features on device, or None for the image path
    start_epoch: int = 0

    def sampler(self, epoch: int) -> DistributedSampler:
        s = DistributedSampler(range(len(self.dataset)), num_replicas=self.ctx.world_size, rank=self.ctx.rank,
                               shuffle=True, seed=self.cfg.train.seed, drop_last=True)
        s.set_epoch(epoch)
        return s

    def batches(self, epoch: int) -> Iterator[torch.Tensor]:
        """Standardised feature batches (b, D) of this rank, in the epoch's order."""
        b = self.cfg.train.batch_size
        sampler = self.sampler(epoch)
        if self.cached is not None:
            idx = torch.tensor(list(sampler), dtype=torch.long, device=self.ctx.device)
            for j in range(len(idx) // b):
                yield self.cached[idx[j * b:(j + 1) * b]]
            return
        # The release's way: the frozen backbone runs on every image in every epoch.
        loader = image_loader(self.dataset, self.ctx, b, self.cfg.workers(self.ctx.cuda), sampler=sampler, drop_last=True)
        for images in loader:
            # The backbone's batch is extract_batch_size, as in extraction: the same speed per image.
            raw = backbone_features(self.extractor, images, self.ctx, self.cfg.amp, self.cfg.extract_batch_size)
            yield standardize(raw, self.extractor.indices)

    def steps_per_epoch(self) -> int:
        return len(self.sampler(0)) // self.cfg.train.batch_size

    def train_one_epoch(self, epoch: int) -> dict:
        cfg, ctx = self.cfg, self.ctx
        torch.manual_seed(epoch_seed(cfg.train.seed + ctx.rank, epoch))
        noise = torch.Generator(device=ctx.device)
        noise.manual_seed(epoch_seed(cfg.train.seed, epoch))
        steps, accum = self.steps_per_epoch(), cfg.train.accum_iter
        if steps == 0:
            raise UserError(f"{len(self.dataset)} training images give no full batch of "
                            f"{cfg.train.batch_size} x {ctx.world_size} process(es); lower --batch_size")
        base, world, rank = base_lr(cfg, ctx.world_size), ctx.world_size, ctx.rank
        self.net.train()
        total, lr, start = torch.zeros((), device=ctx.device), 0.0, time.perf_counter()
        bar = progress(self.batches(epoch), f"epoch {epoch}", ctx.is_main, total=steps, unit="step", leave=False)
        for step, z0 in enumerate(bar):  # z0: (b, D)
            if step % accum == 0:
                lr = lr_at(cfg, base, epoch + step / steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
            b, dim = z0.shape
            t = torch.randint(0, self.diffusion.timesteps, (world * b,), generator=noise, device=ctx.device)[rank::world]
            eps = torch.randn((world * b, dim), generator=noise, device=ctx.device)[rank::world]
            last_micro = (step + 1) % accum == 0 or step + 1 == steps
            sync = nullcontext() if last_micro or not ctx.distributed else self.net.no_sync()
            with sync:
                with autocast(self.ctx, cfg.amp):
                    loss = self.diffusion.training_loss(self.net, z0, t, eps)
                global_loss = all_reduce_mean(loss.detach(), ctx)
                if not torch.isfinite(global_loss):
                    raise NonFiniteLoss(f"loss is {global_loss.item()} at epoch {epoch}, step {step}: stopping; "
                                        f"the last checkpoint written is left as it was")
                self.scaler.scale(loss / accum).backward()
            if last_micro:
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.ema.update(self.model)
            total += global_loss
            if ctx.is_main and step % 20 == 0:
                bar.set_postfix(loss=f"{global_loss.item():.4f}")
        seconds = time.perf_counter() - start
        return {"epoch": epoch, "loss": (total / steps).item(), "lr": lr, "steps": steps,
                "samples_per_s": steps * cfg.train.batch_size * world / seconds, "seconds": seconds}

    def payload(self, epoch: int) -> dict:
        return make_payload(self.model.state_dict(), self.ema.state_dict(), self.optimizer.state_dict(),
                            self.scaler.state_dict(), epoch, config_to_dict(self.cfg), backbone_record(self.cfg, self.extractor))

    def save(self, epoch: int) -> list:
        """checkpoint-<epoch>.pth every save_every epochs (epoch 0 included) and checkpoint-last.pth at every
        save and at the end; rank 0 writes, everyone waits."""
        cfg = self.cfg
        names = []
        if epoch % cfg.train.save_every == 0:
            names.append(f"checkpoint-{epoch}.pth")
        if names or epoch + 1 == cfg.train.epochs:
            names.append("checkpoint-last.pth")
        if self.ctx.is_main and names:
            first = os.path.join(cfg.output_dir, names[0])
            save_checkpoint(self.payload(epoch), first)
            for name in names[1:]:
                atomic_link(first, os.path.join(cfg.output_dir, name))
        barrier(self.ctx)
        return names


def backbone_record(cfg: Config, extractor: MultiLayerFeatures) -> dict:
    return {"name": extractor.name, "identity": extractor.identity, "input_size": cfg.backbone.input_size,
            "feature_dim": extractor.feature_dim, "indices": extractor.indices}


def build_trainer(cfg: Config, ctx: DistContext, resume: Optional[str] = None,
                  init_from: Optional[str] = None) -> Trainer:
    torch.manual_seed(cfg.train.seed + ctx.rank)
    dataset = random_subset(build_dataset(cfg.train.dataset, "train", cfg.data_path, cfg.backbone.input_size,
                                          cfg.download), cfg.train.subset)
    resumed = load_checkpoint(resume) if resume else None
    initial = load_checkpoint(init_from) if init_from else None
    if resumed is not None and resumed.kind != "dlsr":
        raise UserError(f"{resume}: --resume takes a checkpoint written by this trainer; "
                        f"use --pre_ckpt_path to start from a release checkpoint")
    backbone_state = initial.backbone_state if initial is not None else None
    extractor = MultiLayerFeatures(cfg.backbone.name, cfg.backbone.weights, backbone_state).to(ctx.device)
    diffusion = build_diffusion(cfg)
    for ck in (resumed, initial):
        if ck is not None:
            check_against(ck, extractor.name, cfg.backbone.input_size, extractor.feature_dim, extractor.identity,
                          diffusion, "the config")
    cached = None
    if cfg.train.cache_features:
        feats = load_or_extract(extractor, dataset, "train", ctx, cache_dir=cfg.feature_cache_dir,
                                input_size=cfg.backbone.input_size, batch_size=cfg.extract_batch_size,
                                num_workers=cfg.workers(ctx.cuda), amp=cfg.amp, desc="extracting train features")
        if ctx.is_main:
            log.info("train features: %d x %d (%s)", *feats.raw.shape,
                     "from cache" if feats.from_cache else f"extracted in {feats.seconds:.1f}s")
        cached = standardize(feats.raw.to(ctx.device), extractor.indices)  # (N, D)

    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_lfdn(cfg, extractor.feature_dim).to(ctx.device)
    t = cfg.train
    optimizer = torch.optim.AdamW(model.parameters(), lr=base_lr(cfg, ctx.world_size), weight_decay=t.weight_decay,
                                  betas=tuple(t.betas))
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and ctx.cuda)
    start_epoch = 0
    if initial is not None:
        _load_weights(model, initial, "--pre_ckpt_path")
    ema = EMA(model, t.ema_decay)
    if resumed is not None:
        _load_weights(model, resumed, "--resume")
        if resumed.ema is not None:
            ema.load_state_dict(resumed.ema)
        optimizer.load_state_dict(resumed.optimizer)
        for group in optimizer.param_groups:  # the config given now wins over the saved hyperparameters
            group["weight_decay"], group["betas"] = t.weight_decay, tuple(t.betas)
        if resumed.scaler:
            scaler.load_state_dict(resumed.scaler)
        start_epoch = resumed.epoch + 1
    net = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.cuda else None) \
        if ctx.distributed else model
    return Trainer(cfg, ctx, extractor, diffusion, model, net, ema, optimizer, scaler, dataset, cached, start_epoch)


def _load_weights(model: LFDN, ckpt: LoadedCheckpoint, flag: str) -> None:
    try:
        model.load_state_dict(ckpt.model)
    except RuntimeError as e:
        raise UserError(f"{ckpt.path} ({flag}) does not fit the LFDN of this config: "
                        f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}") from None


def train(cfg: Config, ctx: DistContext, resume: Optional[str] = None, init_from: Optional[str] = None) -> Trainer:
    """The whole run: build, then epochs from ``start_epoch``; returns the trainer at the end."""
    trainer = build_trainer(cfg, ctx, resume, init_from)
    if ctx.is_main:
        os.makedirs(cfg.output_dir, exist_ok=True)
        os.makedirs(cfg.log_folder, exist_ok=True)
        save_config(cfg, os.path.join(cfg.log_folder, "config.yaml"))
        log.info("LFDN %.2fM parameters; %d images, %d steps/epoch on %d process(es); epochs %d..%d",
                 sum(p.numel() for p in trainer.model.parameters()) / 1e6, len(trainer.dataset),
                 trainer.steps_per_epoch(), ctx.world_size, trainer.start_epoch, cfg.train.epochs - 1)
    writer = _tensorboard(cfg.log_folder) if ctx.is_main else None
    epochs = progress(range(trainer.start_epoch, cfg.train.epochs), "training", ctx.is_main, unit="epoch")
    try:
        for epoch in epochs:
            stats = trainer.train_one_epoch(epoch)
            saved = trainer.save(epoch)
            if ctx.is_main:
                epochs.set_postfix(loss=f"{stats['loss']:.4f}")
                with open(os.path.join(cfg.log_folder, "log.txt"), "a") as f:
                    f.write(json.dumps({**stats, "saved": saved}) + "\n")
                if writer is not None:
                    writer.add_scalar("train/loss", stats["loss"], epoch)
                    writer.add_scalar("train/lr", stats["lr"], epoch)
    finally:
        if writer is not None:
            writer.close()
    return trainer


def _tensorboard(log_dir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=log_dir)
