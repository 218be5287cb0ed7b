"""Checkpoints: our one-file format (written atomically) and the authors' release files (docs/METHOD.md §8).

Every load uses ``torch.load(weights_only=True)``; the only class allowed beyond tensors and
containers is ``argparse.Namespace`` (the release stores its ``args`` as one). A pickle that asks
for anything else is refused, never executed.
"""
import argparse
import os
import pickle
from dataclasses import dataclass
from typing import Optional

import torch

from errors import UserError, load_refusal
from models.diffusion import GaussianDiffusion
from models.features import BackboneId, weights_digest
from models.backbones import fixed_backbones
from store.atomic import atomic_torch_save

FORMAT = "dlsr-checkpoint/1"
RELEASE_PREFIX = "model.diffusion_model."
RELEASE_EMA_PREFIX = "model_ema."
RELEASE_BACKBONE_PREFIX = "pretrained_encoder.backbone."


@dataclass
class LoadedCheckpoint:
    path: str
    kind: str                            # "dlsr" (ours) or "release" (the authors')
    model: dict                          # raw LFDN weights, names as in models.lfdn.LFDN
    ema: Optional[dict]                  # {"decay", "num_updates", "weights"}; None if the file has no EMA
    epoch: Optional[int]
    optimizer: Optional[dict] = None
    scaler: Optional[dict] = None
    config: Optional[dict] = None        # our resolved config (ours only)
    backbone: Optional[dict] = None      # the BackboneId record of its training run (ours only)
    backbone_state: Optional[dict] = None  # backbone weights carried by release files
    alphas_cumprod: Optional[torch.Tensor] = None  # the schedule buffer of release files
    run_id: Optional[str] = None         # the training run that wrote it (ours; release files have none)
    in_progress: Optional[dict] = None   # {"step", "loss_sum"}: saved inside epoch ``epoch`` (a preemption)
    world_size: Optional[int] = None     # the processes of the run that wrote it (ours, since issue 29)

    @property
    def eval_weights(self) -> dict:
        """Evaluation always uses the EMA weights when the file has them."""
        return self.ema["weights"] if self.ema is not None else self.model

    def lfdn_sizes(self) -> dict:
        """LFDN constructor sizes read off the weights' shapes."""
        w = self.model
        blocks = {k.split(".")[1] for k in w if k.startswith("res_blocks.")}
        return {
            "in_channels": w["input_proj.1.weight"].shape[1],
            "model_channels": w["input_proj.1.weight"].shape[0],
            "time_embed_dim": w["time_embed.0.weight"].shape[0],
            "bottleneck_channels": w["res_blocks.0.in_layers.2.weight"].shape[0] if blocks else 0,
            "out_channels": w["out.2.weight"].shape[0],
            "num_res_blocks": len(blocks),
        }


def save_checkpoint(payload: dict, path: str) -> None:
    """Atomic: an interrupted save leaves the previous file intact and no partial file behind."""
    atomic_torch_save(payload, path)


def make_payload(*, model: dict, ema: dict, optimizer: dict, scaler: dict, epoch: int, config: dict,
                 backbone: BackboneId, run_id: str, in_progress: Optional[dict] = None,
                 world_size: int = 1) -> dict:
    """Our checkpoint: everything to resume or evaluate, the run's id, and a checksum of the weights.
    ``epoch`` is the last epoch finished, or with ``in_progress`` ({"step", "loss_sum"}) the epoch
    that was stopped after that many optimiser steps."""
    return {"format": FORMAT, "model": model, "ema": ema, "optimizer": optimizer, "scaler": scaler,
            "epoch": epoch, "in_progress": in_progress, "config": config, "backbone": backbone.record(),
            "run_id": run_id, "world_size": world_size, "checksum": weights_checksum(model, ema)}


def weights_checksum(model: dict, ema: Optional[dict]) -> dict:
    return {"model": weights_digest(model), "ema": weights_digest(ema["weights"]) if ema else None}


TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # a zip archive (torch.save) or a legacy pickle


def read_raw(path: str) -> dict:
    if os.path.isdir(path):
        raise UserError(f"checkpoint {path!r} is a folder, not a checkpoint file")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path!r} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith(TORCH_MAGIC):
        what = "an empty file" if not head else "a text or other file"
        raise UserError(f"{path!r}: not a readable checkpoint: {what}, not one written by torch.save")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: refused to load: it asks to run code or build objects that are not "
                        f"weights ({load_refusal(e)}); only plain checkpoints are loaded") from None
    except Exception as e:  # truncated zip, garbage bytes (KeyError/EOFError from the unpickler), ...
        raise UserError(f"{path}: not a readable checkpoint, truncated or not a torch file ({load_refusal(e)})") \
            from None
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise UserError(f"{path}: not a DLSR checkpoint (expected a dict with a 'model' state dict)")
    return obj


def load_checkpoint(path: str) -> LoadedCheckpoint:
    obj = read_raw(path)
    if obj.get("format") == FORMAT:
        ck = LoadedCheckpoint(path, "dlsr", obj["model"], obj.get("ema"), obj.get("epoch"), obj.get("optimizer"),
                              obj.get("scaler"), obj.get("config"), obj.get("backbone"), run_id=obj.get("run_id"),
                              in_progress=obj.get("in_progress"), world_size=obj.get("world_size"))
        stored = obj.get("checksum")
        if stored is not None and stored != weights_checksum(ck.model, ck.ema):
            raise UserError(f"{path!r}: its weights do not match the checksum stored with them: the file is "
                            f"damaged (flipped bits?); use another copy or checkpoint")
    elif any(k.startswith(RELEASE_PREFIX) for k in obj["model"]):
        ck = _from_release(path, obj)
    else:
        raise UserError(f"{path}: not a DLSR checkpoint (neither our format nor the release's "
                        f"'{RELEASE_PREFIX}*' layout)")
    for what, weights in (("weights", ck.model), ("EMA weights", ck.ema["weights"] if ck.ema else {})):
        bad = {k: int((~torch.isfinite(v)).sum()) for k, v in weights.items() if v.is_floating_point()}
        bad = {k: n for k, n in bad.items() if n}
        if bad:
            first = next(iter(bad))
            raise UserError(f"{path!r}: {sum(bad.values())} non-finite (NaN/inf) values in its {what} "
                            f"(first in {first}); it cannot score anything")
    return ck


def _from_release(path: str, obj: dict) -> LoadedCheckpoint:
    sd = obj["model"]
    model = {k[len(RELEASE_PREFIX):]: v for k, v in sd.items() if k.startswith(RELEASE_PREFIX)}
    if "input_proj.1.weight" not in model:
        raise UserError(f"{path}: release checkpoint without LFDN weights (no {RELEASE_PREFIX}input_proj.1.weight)")
    # The release's EMA stores each parameter under its name relative to ``model.`` with the dots removed.
    ema_keys = {n: RELEASE_EMA_PREFIX + ("diffusion_model." + n).replace(".", "") for n in model}
    ema = None
    if all(k in sd for k in ema_keys.values()):
        ema = {"decay": float(sd.get(RELEASE_EMA_PREFIX + "decay", torch.tensor(0.9999))),
               "num_updates": int(sd.get(RELEASE_EMA_PREFIX + "num_updates", torch.tensor(0))),
               "weights": {n: sd[k] for n, k in ema_keys.items()}}
    backbone = {k[len(RELEASE_BACKBONE_PREFIX):]: v for k, v in sd.items() if k.startswith(RELEASE_BACKBONE_PREFIX)}
    epoch = obj.get("epoch")
    return LoadedCheckpoint(path, "release", model, ema, int(epoch) if epoch is not None else None,
                            backbone_state=backbone or None, alphas_cumprod=sd.get("alphas_cumprod"))


def peek(path: Optional[str]) -> Optional[dict]:
    """Our checkpoint's small fields ("config", "run_id", "epoch", "world_size", "in_progress") read
    without loading its weights (they are memory-mapped, never read); None where ``path`` is not one
    of our checkpoints or cannot be read that way (``load_checkpoint`` then says what is wrong)."""
    if not path or not os.path.isfile(path):
        return None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip-format torch file, or not one at all
        return None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        return None
    return {k: obj.get(k) for k in ("config", "run_id", "epoch", "world_size", "in_progress")}


def stored_config(path: Optional[str]) -> Optional[dict]:
    """The config stored in our checkpoint at ``path`` (``peek``), None where there is none."""
    return (peek(path) or {}).get("config")


def check_against(ckpt: LoadedCheckpoint, *, backbone: BackboneId, diffusion: GaussianDiffusion,
                  config_source: str) -> None:
    """Refuse a checkpoint whose features (``backbone``: those this run computes) or schedule differ
    from what this run will use."""
    width = ckpt.lfdn_sizes()["in_channels"]
    if width != backbone.feature_dim:
        guess = [n for n, s in fixed_backbones().items() if s.indices[-1] == width]
        hint = f" (a {guess[0]} checkpoint?)" if guess else ""
        raise UserError(f"{ckpt.path} expects {width}-d features{hint} but {config_source} uses {backbone.name} "
                        f"with {backbone.feature_dim}-d features; pass the config the checkpoint was trained with")
    if ckpt.kind == "release":
        abar = ckpt.alphas_cumprod
        ours = diffusion.alphas_cumprod.float()
        if abar is not None and (abar.shape != ours.shape or not torch.allclose(abar.float(), ours, atol=1e-6)):
            raise UserError(f"{ckpt.path} was trained with a different noise schedule than {config_source} "
                            f"(alphas_cumprod differ); set diffusion.* to match it")
        return
    trained = ckpt.backbone or {}
    if trained.get("name") != backbone.name or trained.get("input_size") != backbone.input_size:
        raise UserError(f"{ckpt.path} was trained on {trained.get('name')} features at {trained.get('input_size')} "
                        f"px but {config_source} uses {backbone.name} at {backbone.input_size} px")
    if trained.get("identity") != backbone.identity:
        raise UserError(f"{ckpt.path} was trained on features of backbone {trained.get('identity')} but the "
                        f"backbone loaded now is {backbone.identity} (other weights); use the same weights file")
    sched = ckpt.config.get("diffusion", {}) if ckpt.config else {}
    for key in ("timesteps", "linear_start", "linear_end"):
        if key in sched and sched[key] != getattr(diffusion, key):
            raise UserError(f"{ckpt.path} was trained with diffusion.{key}={sched[key]} but {config_source} "
                            f"has {getattr(diffusion, key)}")
