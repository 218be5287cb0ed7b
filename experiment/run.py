"""What a run is, and how it is scored: one source of truth for every script and the Python API.

What a run *is* comes from its checkpoint: the backbone and its taps, the LFDN, the noise
schedule, the training set and subset, the seed (``RUN_KEYS``), each as the checkpoint's stored
config says. How to *score* it (the eval section, k and eta, the device, batch sizes, paths) comes
from the YAML and the flags given. One rule for a value given that contradicts the run:

- resuming (main.py --resume): refused, naming both values (``check_resume``), since a resumed
  run continues one trajectory; the learning-rate schedule's shape and the effective batch are
  part of it there;
- evaluating (test_mse_mfsim.py, test_LR.py, predict.py, ``DLSRDetector.from_checkpoint``): the
  checkpoint's value is used, and one line says so (``run_config``).

The authors' release checkpoints store no config: for them the config given is used, else
config/Config.yaml, the release's own settings (one line says so). What their weights fix (the
LFDN's sizes, the schedule, the feature width) is checked against that config when they load.
"""
import logging
import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Union

from errors import UserError
from experiment.config import DEFAULT_CONFIG, Config, config_from_dict, load_config, value_at
from models.features import weights_digest
from store.checkpoint import LoadedCheckpoint
from store.rundir import same_file

log = logging.getLogger("dlsr")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUN_KEYS = ("backbone.name", "backbone.input_size", "backbone.layers",
            "lfdn.model_channels", "lfdn.time_embed_dim", "lfdn.bottleneck_channels", "lfdn.num_res_blocks",
            "lfdn.dropout", "diffusion.timesteps", "diffusion.linear_start", "diffusion.linear_end",
            "train.dataset", "train.subset", "train.seed")
# A resumed run also continues one trajectory: its learning-rate schedule's shape and its effective batch.
TRAJECTORY_KEYS = ("train.cosine_lr", "train.warmup_epochs")


@dataclass
class RunConfig:
    cfg: Config                                # the config to score with: the run's definition, the given settings
    checkpoints: Dict[str, LoadedCheckpoint]   # {role: checkpoint}: "end", or "first" and "end"
    source: str                                # the words naming where the settings came from


def default_config_path() -> str:
    """config/Config.yaml: the working folder's where there is one (the seed's commands run in the
    repository), else the repository's own (the API from another folder)."""
    return DEFAULT_CONFIG if os.path.isfile(DEFAULT_CONFIG) else os.path.join(ROOT, DEFAULT_CONFIG)


def stored(ck: LoadedCheckpoint, key: str):
    """The value of ``key`` ("train.dataset") in ``ck``'s stored config; KeyError where it has none."""
    section, leaf = key.split(".")
    return (ck.config or {})[section][leaf]


def differences(cfg: Config, ck: LoadedCheckpoint, keys) -> List[tuple]:
    """[(key, value in cfg, the run's value)] for each of ``keys`` where ``cfg`` differs from ``ck``'s
    stored config (keys older checkpoints do not store are skipped)."""
    out = []
    for key in keys:
        try:
            theirs = stored(ck, key)
        except KeyError:
            continue
        ours = value_at(cfg, key)
        if ours != theirs:
            out.append((key, ours, theirs))
    return out


def effective_batch(batch_size: int, world_size: int, accum_iter: int) -> str:
    return f"{batch_size * world_size * accum_iter} ({batch_size} x {world_size} process(es) x {accum_iter} accumulation)"


def resume_differences(cfg: Config, world_size: int, ck: LoadedCheckpoint) -> List[str]:
    """What differs between ``cfg`` on ``world_size`` processes and the run that wrote ``ck``, as
    "key: X now, the run's Y" lines; empty when ``cfg`` continues that run."""
    out = [f"{key}: {ours!r} now, the run's {theirs!r}"
           for key, ours, theirs in differences(cfg, ck, RUN_KEYS + TRAJECTORY_KEYS)]
    train = (ck.config or {}).get("train", {})
    if "batch_size" in train:
        world = ck.world_size or world_size  # checkpoints before the world size was stored: assume the same
        theirs = (train["batch_size"], world, train.get("accum_iter", 1))
        ours = (cfg.train.batch_size, world_size, cfg.train.accum_iter)
        if theirs[0] * theirs[1] * theirs[2] != ours[0] * ours[1] * ours[2]:
            out.append(f"effective batch: {effective_batch(*ours)} now, the run's {effective_batch(*theirs)}")
    return out


def held_differences(cfg: Config, world_size: int, held: dict) -> List[str]:
    """``resume_differences`` against the small fields ``store.checkpoint.peek`` read of a checkpoint."""
    return resume_differences(cfg, world_size, SimpleNamespace(config=held.get("config"),
                                                               world_size=held.get("world_size")))


def check_resume(cfg: Config, world_size: int, ck: LoadedCheckpoint) -> None:
    """Refuse to resume ``ck`` under a config that trains something else (one line naming both values)."""
    if ck.kind != "dlsr":
        raise UserError(f"{ck.path}: --resume takes a checkpoint written by this trainer; "
                        f"use --pre_ckpt_path to start from a release checkpoint")
    diffs = resume_differences(cfg, world_size, ck)
    if diffs:
        raise UserError(f"--resume {ck.path}: a resumed run is the same run, but {'; '.join(diffs)}. Resume with "
                        f"the run's settings, or start a new run from these weights with --pre_ckpt_path "
                        f"{ck.path} (a new run id; docs/OPERATIONS.md)")


def adopt_run(cfg: Config, ck: LoadedCheckpoint, source: str, say: bool = True) -> Config:
    """``cfg`` with every value of ``RUN_KEYS`` taken from ``ck``'s stored config; one line per value
    ``source`` set otherwise. ``cfg`` is changed in place and returned."""
    for key, ours, theirs in differences(cfg, ck, RUN_KEYS):
        if say:
            log.warning("%s sets %s = %s, but %s was trained with %s: using %s (what a run is comes from its "
                        "checkpoint)", source, key, _shown(ours), ck.path, _shown(theirs), _shown(theirs))
        section, leaf = key.split(".")
        setattr(getattr(cfg, section), leaf, theirs)
    return cfg


def _shown(value) -> str:
    return "null" if value is None else str(value)


def run_config(checkpoints: Dict[str, LoadedCheckpoint], given: Union[str, Config, None] = None,
               apply_flags: Optional[Callable[[Config], Config]] = None, say: bool = True) -> RunConfig:
    """The config that scores ``checkpoints`` ({role: checkpoint}; "end" defines the run): ``given``
    (a YAML path or a Config) or, without one, the config stored in the end checkpoint (the authors'
    files store none: then config/Config.yaml); ``apply_flags`` (the command line) on top; then the
    run's definition from the checkpoint (``adopt_run``)."""
    end = checkpoints["end"]
    if given is not None:
        source = given if isinstance(given, str) else "the config given"
        cfg = load_config(given) if isinstance(given, str) else given
    elif end.config is not None:
        source = f"the config stored in {end.path}"
        cfg = config_from_dict(end.config, source=source)
    else:
        source = default_config_path()
        if say:
            log.warning("%s stores no config (an authors' release file): using %s, the release's settings; pass "
                        "a config to use another", end.path, source)
        cfg = load_config(source)
    if apply_flags is not None:
        cfg = apply_flags(cfg)
    if end.config is not None:
        cfg = adopt_run(cfg, end, source, say)
    return RunConfig(cfg, checkpoints, source)


def checkpoints_agree(ckpts: Dict[str, LoadedCheckpoint]) -> None:
    """Two checkpoints scored together (LR) come from one run: the same run id and backbone weights."""
    runs = {role: c.run_id for role, c in ckpts.items() if c.run_id}
    if len(runs) == len(ckpts) > 1 and len(set(runs.values())) > 1:
        raise UserError(f"the checkpoints come from different training runs "
                        f"({', '.join(f'{r}: {c.path} (run {c.run_id[:8]})' for r, c in ckpts.items())}); "
                        f"LR compares the first and the last checkpoint of one run")
    digests = {role: weights_digest(c.backbone_state) for role, c in ckpts.items() if c.backbone_state is not None}
    if len(set(digests.values())) > 1:
        raise UserError(f"the checkpoints carry different backbone weights "
                        f"({', '.join(f'{r}: {d}' for r, d in digests.items())}); they must come from one run")


def check_lr_pair(first: LoadedCheckpoint, end: LoadedCheckpoint) -> None:
    """LR compares an early checkpoint of a run with a later one: two different files, first earlier."""
    if same_file(first.path, end.path):
        raise UserError(f"--pretrained_ldm_ckpt_first and --pretrained_ldm_ckpt_end are the same file ({end.path}); "
                        f"LR compares an early checkpoint of a run with a later one (e.g. checkpoint-0.pth and "
                        f"checkpoint-last.pth)")
    if first.epoch is not None and end.epoch is not None:
        at = [(c.epoch, int((c.in_progress or {}).get("step", 1 << 62))) for c in (first, end)]  # a finished epoch last
        if not at[0] < at[1]:
            raise UserError(f"the first checkpoint {first.path} (epoch {first.epoch}) is not earlier than the end "
                            f"checkpoint {end.path} (epoch {end.epoch}); swap them, or pass another pair")
