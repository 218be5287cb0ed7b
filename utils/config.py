"""One YAML per experiment, loaded into typed dataclasses. Unknown keys and wrong types are errors
that name the key; command-line flags override values through ``override``."""
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml

from models.diffusion import INDEXING
from utils.errors import UserError
from utils.metrics import FPR95_CONVENTIONS
from utils.scores import SCORE_TYPES


@dataclass
class BackboneConfig:
    name: str = "efficientnet-b4"
    weights: Optional[str] = None       # file path; None: search ./ and ./checkpoint/, then download
    input_size: int = 224
    layers: Optional[List[int]] = None  # taps the LFDN's vector uses (0-based); None: all (the paper)


@dataclass
class LFDNConfig:
    # Input/output width is the backbone's feature width; these are the inner sizes.
    model_channels: int = 1440
    time_embed_dim: int = 720
    bottleneck_channels: int = 1440
    num_res_blocks: int = 16
    dropout: float = 0.0


@dataclass
class DiffusionConfig:
    timesteps: int = 100
    linear_start: float = 0.0015
    linear_end: float = 0.0195
    subset_timesteps_num: int = 3       # k: noise level and number of DDIM steps at test time
    eta: float = 1.0
    indexing: str = "release"           # release | consistent (see GaussianDiffusion.reconstruct)


@dataclass
class TrainConfig:
    dataset: str = "cifar10"
    subset: Optional[int] = None        # train on a fixed seeded subset of this many images
    batch_size: int = 256               # per process
    epochs: int = 150
    lr: Optional[float] = 1e-5          # None: blr * batch_size * accum_iter * world_size / 256
    blr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 0.02
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    cosine_lr: bool = False
    warmup_epochs: int = 0
    accum_iter: int = 1
    ema_decay: float = 0.9999
    save_every: int = 25
    seed: int = 0
    cache_features: bool = True         # False: run the backbone on every image every epoch, as the release


def _cifar10_benchmark() -> Dict[str, str]:
    return {
        "CIFAR100": "cifar100",
        "SVHN": "svhn",
        "LSUN": "folder:LSUN",
        "LSUN_resize": "folder:LSUN_resize",
        "iSUN": "folder:iSUN",
        "DTD": "folder:dtd/images",
        "Places365": "folder:places365",
    }


@dataclass
class EvalConfig:
    dataset: str = "cifar10"            # the ID test set (its test split)
    ood: Dict[str, str] = field(default_factory=_cifar10_benchmark)
    batch_size: int = 64
    similarity_type: str = "MFsim"      # the headline score: MSE | MFsim
    mfsim_layers: str = "release"       # release: skip layer 0, divide by L-1 | all: average all L layers
    fpr95: str = "release"              # release: ID-positive | ood_positive: OpenOOD v1.5 / pytorch-ood
    seed: int = 0
    groups: Dict[str, str] = field(default_factory=dict)   # OOD set name -> near | far (mean rows per group)
    baselines: List[str] = field(default_factory=list)     # knn, mahalanobis: scored on the same features
    knn_k: List[int] = field(default_factory=lambda: [1, 50])


@dataclass
class Config:
    data_path: str = "./data"
    output_dir: str = "./checkpoint"
    log_dir: Optional[str] = None       # None: output_dir
    cache_dir: Optional[str] = None     # None: <data_path>/feature_cache
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    amp: bool = True                    # fp16 autocast (and a grad scaler in training) on CUDA only
    precision: str = "fp32"             # CPU: fp32 (exact, default) | bf16 (autocast, opt-in, native bf16 CPUs only)
    channels_last: bool = False         # backbone convolutions in channels-last layout (opt-in; other rounding)
    download: bool = True               # let torchvision download missing sets where there is internet
    num_workers: Optional[int] = None   # image decoding workers per process; None: 0 on CPU, up to 8 on CUDA
    extract_batch_size: int = 64
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    lfdn: LFDNConfig = field(default_factory=LFDNConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def feature_cache_dir(self) -> str:
        return self.cache_dir or os.path.join(self.data_path, "feature_cache")

    @property
    def log_folder(self) -> str:
        return self.log_dir or self.output_dir

    def workers(self, cuda: bool) -> int:
        """Decoding workers: on CPU the backbone needs both cores and decoding costs ~1% of it
        (bench/RESULTS.md), so decode in-process; on a GPU decoding is the bottleneck."""
        if self.num_workers is not None:
            return self.num_workers
        return min(8, max(1, (os.cpu_count() or 2) - 1)) if cuda else 0


# The one table of allowed values: the flags take their choices from here, and the modules that
# implement each choice own its tuple.
CHOICES = {
    "precision": ("fp32", "bf16"),
    "diffusion.indexing": INDEXING,
    "eval.similarity_type": SCORE_TYPES,
    "eval.mfsim_layers": ("release", "all"),
    "eval.fpr95": FPR95_CONVENTIONS,
}


def load_config(path: str) -> Config:
    if os.path.isdir(path):
        raise UserError(f"config {path!r} is a folder, not a YAML file (see config/ for the shipped ones)")
    if not os.path.isfile(path):
        raise UserError(f"config file {path!r} does not exist (see config/ for the shipped ones)")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return config_from_dict(data, source=path)


def config_from_dict(data: dict, source: str = "config") -> Config:
    cfg = _build(Config, data, prefix="", source=source)
    validate(cfg, source)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)


def override(cfg: Config, key: str, value: Any, source: str = "command line") -> None:
    """Set ``key`` ("train.epochs") to ``value``; a string value is parsed as YAML ("3" -> 3)."""
    *parents, leaf = key.split(".")
    obj = cfg
    for p in parents:
        if not dataclasses.is_dataclass(obj) or p not in _fields(type(obj)):
            raise UserError(f"{source}: unknown config key {key!r}")
        obj = getattr(obj, p)
    fields = _fields(type(obj)) if dataclasses.is_dataclass(obj) else {}
    if leaf not in fields or dataclasses.is_dataclass(fields[leaf]):
        raise UserError(f"{source}: unknown config key {key!r}")
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    setattr(obj, leaf, _coerce(fields[leaf], value, key, source))
    validate(cfg, source)


def validate(cfg: Config, source: str) -> None:
    for key, allowed in CHOICES.items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value not in allowed:
            raise UserError(f"{source}: {key} must be one of {', '.join(allowed)}, got {value!r}")
    if not (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:")):
        raise UserError(f"{source}: device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    positive = {"train.batch_size": cfg.train.batch_size, "train.epochs": cfg.train.epochs,
                "train.accum_iter": cfg.train.accum_iter, "train.save_every": cfg.train.save_every,
                "eval.batch_size": cfg.eval.batch_size, "extract_batch_size": cfg.extract_batch_size,
                "backbone.input_size": cfg.backbone.input_size, "train.subset": 1 if cfg.train.subset is None else cfg.train.subset,
                "diffusion.timesteps": cfg.diffusion.timesteps}
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"{source}: {key} must be positive, got {value}")
    if cfg.num_workers is not None and cfg.num_workers < 0:
        raise UserError(f"{source}: num_workers must be >= 0, got {cfg.num_workers}")
    _check_ranges(cfg, source)
    _check_eval_lists(cfg, source)


GROUPS = ("near", "far")


def _check_eval_lists(cfg: Config, source: str) -> None:
    from utils.baselines import BASELINES

    e = cfg.eval
    for name, group in e.groups.items():
        if name not in e.ood:
            raise UserError(f"{source}: eval.groups names {name!r}, which is not an OOD set ({', '.join(e.ood)})")
        if group not in GROUPS:
            raise UserError(f"{source}: eval.groups.{name} must be one of {', '.join(GROUPS)}, got {group!r}")
    for b in e.baselines:
        if b not in BASELINES:
            raise UserError(f"{source}: eval.baselines may hold {', '.join(BASELINES)}, got {b!r}")
    if not e.knn_k or any(k < 1 for k in e.knn_k):
        raise UserError(f"{source}: eval.knn_k must be a list of positive integers, got {e.knn_k}")


def _check_ranges(cfg: Config, source: str) -> None:
    """Values that would run but give meaningless numbers (or fail after hours) are refused up front."""
    from models.features import BACKBONES

    d, hp = cfg.diffusion, cfg.train
    top = d.timesteps - 1 if d.indexing == "release" else d.timesteps
    if not 1 <= d.subset_timesteps_num <= top:
        raise UserError(f"{source}: diffusion.subset_timesteps_num (k) must be in 1..{top} with {d.indexing} "
                        f"indexing and {d.timesteps} timesteps, got {d.subset_timesteps_num}")
    ranges = {  # key: (value, low, high, high included)
        "diffusion.eta": (d.eta, 0.0, 1.0, True),
        "diffusion.linear_start": (d.linear_start, 0.0, 1.0, False),
        "diffusion.linear_end": (d.linear_end, 0.0, 1.0, False),
        "train.lr": (hp.lr if hp.lr is not None else 0.0, 0.0, math.inf, False),
        "train.blr": (hp.blr, 0.0, math.inf, False),
        "train.min_lr": (hp.min_lr, 0.0, math.inf, False),
        "train.weight_decay": (hp.weight_decay, 0.0, math.inf, False),
        "train.warmup_epochs": (hp.warmup_epochs, 0, math.inf, False),
        "train.ema_decay": (hp.ema_decay, 0.0, 1.0, True),
        "lfdn.dropout": (cfg.lfdn.dropout, 0.0, 1.0, False),
    }
    for key, (value, low, high, closed) in ranges.items():
        inside = low <= value <= high if closed else low <= value < high
        if not (math.isfinite(value) and inside):
            bound = f"[{low:g}, {high:g}{']' if closed else ')'}"
            raise UserError(f"{source}: {key} must be in {bound}, got {value}")
    if not d.linear_start < d.linear_end:
        raise UserError(f"{source}: diffusion.linear_start must be below linear_end, got {d.linear_start} >= {d.linear_end}")
    if len(hp.betas) != 2 or not all(math.isfinite(b) and 0 <= b < 1 for b in hp.betas):
        raise UserError(f"{source}: train.betas must be two numbers in [0, 1), got {hp.betas}")
    spec = BACKBONES.get(cfg.backbone.name)
    if spec is None:
        raise UserError(f"{source}: unknown backbone.name {cfg.backbone.name!r}; choose one of {', '.join(BACKBONES)}")
    layers = cfg.backbone.layers
    if layers is not None and (not layers or any(not 0 <= l < len(spec.channels) for l in layers)):
        raise UserError(f"{source}: backbone.layers must list taps of {cfg.backbone.name} among "
                        f"0..{len(spec.channels) - 1}, got {layers}")
    if cfg.backbone.input_size < spec.min_input_size:
        raise UserError(f"{source}: backbone.input_size must be at least {spec.min_input_size} for "
                        f"{cfg.backbone.name}, got {cfg.backbone.input_size}")


def _fields(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _build(cls, data: Any, prefix: str, source: str):
    if not isinstance(data, dict):
        raise UserError(f"{source}: {prefix.rstrip('.') or 'the file'} must be a mapping, got {type(data).__name__}")
    fields = _fields(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise UserError(f"{source}: unknown key {prefix + str(unknown[0])!r} "
                        f"(known under {prefix.rstrip('.') or 'top level'}: {', '.join(fields)})")
    kwargs = {}
    for name, value in data.items():
        tp = fields[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.", source)
        else:
            kwargs[name] = _coerce(tp, value, prefix + name, source)
    return cls(**kwargs)


def _coerce(tp, value: Any, key: str, source: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = UserError(f"{source}: {key} should be {_type_name(tp)}, got {value!r}")
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return _coerce(next(a for a in args if a is not type(None)), value, key, source)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(args[0], v, key, source) for v in value]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise bad
        return {str(k): _coerce(args[1], v, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported config type {tp}")


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        return f"{_type_name(next(a for a in args if a is not type(None)))} or null"
    if origin in (list, List):
        return f"a list of {_type_name(args[0])}"
    if origin in (dict, Dict):
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))
