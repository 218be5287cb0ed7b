"""One YAML per experiment, loaded into typed dataclasses. Unknown keys and wrong types are errors
that name the key; command-line flags override values through ``override``."""
import dataclasses
import functools
import math
import os
import re
import reprlib
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml

from errors import UserError
from models.backbones import backbone
from models.diffusion import INDEXING, largest_k
from scoring.baselines import BASELINES
from scoring.metrics import FPR95_CONVENTIONS
from scoring.scores import MFSIM_LAYERS, score_types
from store.report import GROUPS


def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING,
            flag: Optional[str] = None, const: Any = None, metavar: Optional[str] = None, merge: bool = False):
    """A config field with what its command-line flag needs: the help text, and where the flag is
    not the field's own name or is a switch, its name (``flag``) and the value it sets (``const``).
    ``merge``: a mapping flag adds to the config's mapping instead of replacing it."""
    meta = {"help": help, "flag": flag, "const": const, "metavar": metavar, "merge": merge}
    return field(default=default, default_factory=factory, metadata=meta)


DEFAULT_CONFIG = "config/Config.yaml"  # the release's defaults; what every entry point reads unless told


@dataclass
class BackboneConfig:
    name: str = setting("efficientnet-b4", "the frozen ImageNet backbone")
    weights: Optional[str] = setting(None, "ImageNet weights file of the backbone (null: its canonical file name "
                                     "in ./ or ./checkpoint/, else a download)", flag="backbone_weights",
                                     metavar="FILE")
    input_size: int = setting(224, "images are resized to this many pixels a side")
    layers: Optional[List[int]] = setting(None, "taps the LFDN's vector uses, 0-based (null: all, the paper)")


@dataclass
class LFDNConfig:
    # Input/output width is the backbone's feature width; these are the inner sizes.
    model_channels: int = setting(1440, "width of the residual stream")
    time_embed_dim: int = setting(720, "width of the timestep embedding")
    bottleneck_channels: int = setting(1440, "inner width of each residual block")
    num_res_blocks: int = setting(16, "residual blocks")
    dropout: float = setting(0.0, "dropout inside the residual blocks")


@dataclass
class DiffusionConfig:
    timesteps: int = setting(100, "T, steps of the noise schedule")
    linear_start: float = setting(0.0015, "first beta of the linear schedule")
    linear_end: float = setting(0.0195, "last beta of the linear schedule")
    subset_timesteps_num: int = setting(3, "k: the test-time noise level and number of DDIM steps", metavar="K")
    eta: float = setting(1.0, "DDIM eta (1: fresh noise at every step)")
    indexing: str = setting("release", "DDIM indexing: release (its off-by-one, reproduced) or consistent")


@dataclass
class TrainConfig:
    dataset: str = setting("cifar10", "ID training set spec, e.g. cifar10, fashion-mnist, folder:PATH",
                           metavar="SPEC")
    subset: Optional[int] = setting(None, "train on a fixed seeded subset of this many images (null: all)",
                                    metavar="N")
    batch_size: int = setting(256, "training batch per process", metavar="N")
    epochs: int = setting(150, "training epochs", metavar="N")
    lr: Optional[float] = setting(1e-5, "absolute learning rate (null: blr * total batch / 256)")
    blr: float = setting(1e-3, "base learning rate, used when lr is null")
    min_lr: float = setting(0.0, "floor of the cosine schedule")
    weight_decay: float = setting(0.02, "AdamW weight decay")
    betas: List[float] = setting(help="AdamW betas", factory=lambda: [0.9, 0.999])
    cosine_lr: bool = setting(False, "half-cosine decay after warm-up", const=True)
    warmup_epochs: int = setting(0, "epochs of linear learning-rate warm-up", metavar="N")
    accum_iter: int = setting(1, "gradient accumulation steps", metavar="N")
    ema_decay: float = setting(0.9999, "decay of the weights' exponential moving average (evaluation uses it)")
    save_every: int = setting(25, "also keep checkpoint-<epoch>.pth every this many epochs", metavar="N")
    save_overhead: float = setting(0.03, "checkpoint-last.pth is refreshed after every epoch while writing it "
                                   "costs at most this fraction of the training time (1: every epoch, whatever "
                                   "it costs); a stop signal always saves")
    seed: int = setting(0, "seed of everything random in training")
    cache_features: bool = setting(True, "compute the frozen backbone's features once and cache them; false: "
                                   "run the backbone on every image every epoch, as the release (slow; for "
                                   "comparison)", flag="no_cache", const=False)


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
    dataset: str = setting("cifar10", "the ID test set (its test split)", metavar="SPEC")
    ood: Dict[str, str] = setting(help="the OOD sets, NAME: SPEC; the flag is repeatable and replaces the "
                                  "config's sets, e.g. --ood SVHN=svhn --ood Tex=folder:dtd/images",
                                  factory=_cifar10_benchmark, flag="ood", metavar="NAME=SPEC")
    batch_size: int = setting(64, "vectors per reconstruction batch, a speed setting", metavar="N")
    similarity_type: str = setting("MFsim", "the headline score")
    mfsim_layers: str = setting("release", "release: layers 2..L averaged over L-1; all: the paper's formula")
    fpr95: str = setting("release", "FPR95 convention: release (ID-positive threshold) or ood_positive "
                         "(OpenOOD v1.5, pytorch-ood)")
    seed: int = setting(0, "seed of the test-time noise")
    noise_draws: int = setting(1, "test-time noise draws per image, their scores averaged (1: the release; a "
                               "variant, bench/README.md)", metavar="N")
    layer_norm: bool = setting(False, "standardise each layer's reconstruction error by its mean and std on 2,000 "
                               "ID training vectors, then average over all layers (a variant, bench/README.md)",
                               const=True)
    groups: Dict[str, str] = setting(help="OOD set NAME: GROUP, near or far, adding near/far mean rows; the flag "
                                     "is repeatable and adds to the config's groups", factory=dict, flag="group",
                                     metavar="NAME=GROUP", merge=True)
    baselines: List[str] = setting(help="baselines scored on the same features, comma-separated", factory=list,
                                   metavar="LIST")
    knn_k: List[int] = setting(help="kNN's k values, comma-separated", factory=lambda: [1, 50], metavar="LIST")


@dataclass
class Config:
    data_path: str = setting("./data", "root of the datasets", metavar="PATH")
    output_dir: str = setting("./checkpoint", "checkpoints", metavar="PATH")
    log_dir: Optional[str] = setting(None, "log.txt, config.yaml, TensorBoard (null: output_dir)", metavar="PATH")
    cache_dir: Optional[str] = setting(None, "feature cache folder (null: <data_path>/feature_cache)",
                                       metavar="PATH")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")
    amp: bool = setting(True, "fp16 autocast (and a grad scaler in training) on CUDA; false: fp32 throughout",
                        flag="no_amp", const=False)
    precision: str = setting("fp32", "CPU arithmetic: fp32 (exact) or bf16 autocast (opt-in; CPUs with "
                             "native bf16 only)")
    channels_last: bool = setting(False, "channels-last convolutions in the backbone (opt-in; other rounding)",
                                  const=True)
    download: bool = setting(True, "let torchvision download missing sets where there is internet")
    num_workers: Optional[int] = setting(None, "image decoding workers per process (null: 0 on CPU, up to 8 "
                                         "on CUDA)", metavar="N")
    extract_batch_size: int = setting(64, "images per backbone batch")
    backbone: BackboneConfig = setting(factory=BackboneConfig)
    lfdn: LFDNConfig = setting(factory=LFDNConfig)
    diffusion: DiffusionConfig = setting(factory=DiffusionConfig)
    train: TrainConfig = setting(factory=TrainConfig)
    eval: EvalConfig = setting(factory=EvalConfig)

    @property
    def feature_cache_dir(self) -> str:
        return self.cache_dir or os.path.join(self.data_path, "feature_cache")

    @property
    def log_folder(self) -> str:
        return self.log_dir or self.output_dir

    def workers(self, cuda: bool, local_ranks: int = 1) -> int:
        """Decoding workers of one process: on CPU the backbone needs both cores and decoding costs
        ~1% of it (bench/RESULTS.md), so decode in-process; on a GPU decoding is the bottleneck, and
        the node's cores are shared by its ``local_ranks`` processes (one each for the ranks themselves)."""
        if self.num_workers is not None:
            return self.num_workers
        return min(8, max(1, (os.cpu_count() or 2) // max(1, local_ranks) - 1)) if cuda else 0


# The one table of allowed values: validation and the flags take them from here, and the modules
# that implement each choice own its tuple. A list's items, and a mapping's values, are checked.
CHOICES = {
    "precision": ("fp32", "bf16"),
    "diffusion.indexing": INDEXING,
    "eval.similarity_type": score_types,  # called: the score registry may grow after import
    "eval.mfsim_layers": MFSIM_LAYERS,
    "eval.fpr95": FPR95_CONVENTIONS,
    "eval.groups": GROUPS,
    "eval.baselines": BASELINES,
}


def _owner(key: str):
    """(the dataclass holding ``key``'s leaf, the leaf's name); ``key`` is dotted ("train.epochs")."""
    cls, (*parents, leaf) = Config, key.split(".")
    for part in parents:
        cls = _fields(cls)[part]
    return cls, leaf


def field_of(key: str) -> dataclasses.Field:
    """The dataclass field behind a config key: its default, and the metadata its flag is made from."""
    cls, leaf = _owner(key)
    return next(f for f in dataclasses.fields(cls) if f.name == leaf)


def field_type(key: str):
    cls, leaf = _owner(key)
    return _fields(cls)[leaf]


def value_at(cfg: Config, key: str) -> Any:
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def load_config(path: str) -> Config:
    """The config at ``path``: a YAML file, optionally an overlay on another (``base: FILE``, relative
    to it): sections merge key by key, values (lists and mappings such as eval.ood included) replace."""
    return config_from_dict(_read_with_bases(path, ()), source=path)


BASE_KEY = "base"


def _read_with_bases(path: str, chain: tuple) -> dict:
    data = read_yaml(path)
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise UserError(f"{path}: {BASE_KEY} must name a YAML file, got {one_line_value(base)}")
    base_path = os.path.normpath(os.path.join(os.path.dirname(path), base))
    if os.path.realpath(base_path) in chain + (os.path.realpath(path),):
        raise UserError(f"{path}: {BASE_KEY}: {base} is an overlay on itself (through {' -> '.join(chain) or path})")
    return _overlay(_read_with_bases(base_path, chain + (os.path.realpath(path),)), data)


def _overlay(base: dict, over: dict) -> dict:
    """``over`` on ``base``: where both hold a config section (a mapping of the schema's sections),
    its keys merge; anything else in ``over`` replaces."""
    out = dict(base)
    sections = {f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.type)}
    for key, value in over.items():
        if key in sections and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def read_yaml(path: str) -> dict:
    """One YAML file as a mapping; every problem is one line naming the file, and where it is."""
    if os.path.isdir(path):
        raise UserError(f"config {path!r} is a folder, not a YAML file (see config/ for the shipped ones)")
    if not os.path.isfile(path):
        raise UserError(f"config file {path!r} does not exist (see config/ for the shipped ones)")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=ConfigLoader)
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {yaml_cause(e)}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if data is None:
        raise UserError(f"{path} is empty: a config sets at least the ID data set (see config/ for the shipped ones)")
    if not isinstance(data, dict):
        raise UserError(f"{path}: the file must be a mapping, got {type(data).__name__}")
    return data


def yaml_cause(e: yaml.YAMLError) -> str:
    """A YAML error's cause and place on one line ("line 3, column 1: found character '\\t' that cannot
    start any token (a tab in the indentation: indent with spaces)")."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    hint = " (a tab in the indentation: indent with spaces)" if "'\\t'" in problem else ""
    return " ".join(f"{where}{problem}{hint}".split())[:300]


class ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader with two changes. A key given twice in one mapping is refused (PyYAML keeps
    the last one, so a second ``train:`` block appended to a file would silently replace the first
    whole); merge keys (``<<: *base``) still merge, and a key they bring may be set again. Numbers are
    read as YAML 1.2 and every user writes them: ``1e-4`` is a float (YAML 1.1 wants ``1.0e-4``)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            place = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            try:
                first = seen.setdefault(key, place)
            except TypeError:  # an unhashable key: the base class says so
                continue
            if first != place:
                where = (f"lines {first[0]} and {place[0]}" if first[0] != place[0] else
                         f"line {place[0]}, columns {first[1]} and {place[1]}")
                raise UserError(f"{key_node.start_mark.name}: the key {one_line_value(key)} appears twice in one "
                                f"mapping ({where}); keep one")
        return super().construct_mapping(node, deep=deep)


# YAML 1.2's floats (1e-4, 1E5, .5, -2.5e+3, .inf, .nan) on top of YAML 1.1's: a plain scalar that reads
# as a number is one.
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_value(text: str) -> Any:
    """A value given as text (``--opt KEY=VALUE``) as the config file would read it; the text itself
    where it is not valid YAML."""
    try:
        return yaml.load(text, Loader=ConfigLoader)
    except (yaml.YAMLError, UserError):
        return text


def one_line_value(value: Any, limit: int = 80) -> str:
    """A value as it appears in a message: its repr on one line, at most ``limit`` characters."""
    text = " ".join(_SHORT.repr(value).split())  # bounded: a YAML alias bomb is never expanded whole
    return text if len(text) <= limit else text[: limit - 4] + " ..."


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxdict, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxstring, _SHORT.maxother = 3, 4, 4, 4, 70, 70


def config_from_dict(data: dict, source: str = "config") -> Config:
    cfg = _build(Config, data, prefix="", source=source)
    validate(cfg, source)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what a run saves as config.yaml, and loads back as it was)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


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
        value = parse_value(value)
    setattr(obj, leaf, _coerce(fields[leaf], value, key, source))
    if key == "eval.ood":  # a new list of OOD sets keeps the groups of the sets it still has
        cfg.eval.groups = {n: g for n, g in cfg.eval.groups.items() if n in cfg.eval.ood}
    validate(cfg, source)


def choices(key: str) -> tuple:
    """The allowed values of ``key`` (CHOICES; a callable entry is asked now)."""
    allowed = CHOICES[key]
    return tuple(allowed() if callable(allowed) else allowed)


def validate(cfg: Config, source: str) -> None:
    for key in CHOICES:
        allowed, value = choices(key), value_at(cfg, key)
        if isinstance(value, dict):
            entries = [(f".{name}", v) for name, v in value.items()]
        elif isinstance(value, list):
            entries = [(f"[{i}]", v) for i, v in enumerate(value)]
        else:
            entries = [("", value)]
        for where, v in entries:
            if v not in allowed:
                raise UserError(f"{source}: {key}{where} must be one of {', '.join(allowed)}, got {one_line_value(v)}")
    if not (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:")):
        raise UserError(f"{source}: device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    positive = {"train.batch_size": cfg.train.batch_size, "train.epochs": cfg.train.epochs,
                "train.accum_iter": cfg.train.accum_iter, "train.save_every": cfg.train.save_every,
                "eval.batch_size": cfg.eval.batch_size, "extract_batch_size": cfg.extract_batch_size,
                "backbone.input_size": cfg.backbone.input_size, "train.subset": 1 if cfg.train.subset is None else cfg.train.subset,
                "diffusion.timesteps": cfg.diffusion.timesteps,
                "eval.noise_draws": cfg.eval.noise_draws}
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"{source}: {key} must be positive, got {value}")
    if cfg.num_workers is not None and cfg.num_workers < 0:
        raise UserError(f"{source}: num_workers must be >= 0, got {cfg.num_workers}")
    _check_ranges(cfg, source)
    _check_eval_lists(cfg, source)


def _check_eval_lists(cfg: Config, source: str) -> None:
    e = cfg.eval
    for name in e.groups:
        if name not in e.ood:
            raise UserError(f"{source}: eval.groups names {name!r}, which is not an OOD set ({', '.join(e.ood)})")
    if not e.knn_k or any(k < 1 for k in e.knn_k):
        raise UserError(f"{source}: eval.knn_k must be a list of positive integers, got {e.knn_k}")
    repeated = sorted({k for k in e.knn_k if e.knn_k.count(k) > 1})
    if repeated:
        raise UserError(f"{source}: eval.knn_k lists k = {', '.join(map(str, repeated))} more than once "
                        f"({e.knn_k}); each k is one score column")


def _check_ranges(cfg: Config, source: str) -> None:
    """Values that would run but give meaningless numbers (or fail after hours) are refused up front."""
    d, hp = cfg.diffusion, cfg.train
    top = largest_k(d.timesteps, d.indexing)
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
        "train.save_overhead": (hp.save_overhead, 0.0, 1.0, True),
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
    try:
        spec = backbone(cfg.backbone.name)
    except UserError as e:
        raise UserError(f"{source}: backbone.name: {e}") from None
    layers = cfg.backbone.layers
    if layers is not None and (not layers or any(not 0 <= l < len(spec.channels) for l in layers)):
        raise UserError(f"{source}: backbone.layers must list taps of {cfg.backbone.name} among "
                        f"0..{len(spec.channels) - 1}, got {layers}")
    if cfg.backbone.input_size < spec.min_input_size:
        raise UserError(f"{source}: backbone.input_size must be at least {spec.min_input_size} for "
                        f"{cfg.backbone.name}, got {cfg.backbone.input_size}")


@functools.cache
def _fields(cls) -> dict:
    """{name: type} of a config dataclass, read once per class (typing.get_type_hints evaluates every
    annotation each call; a config load asks ~50 times). Shared: read it, never change it."""
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


def non_null(tp):
    """Optional[X] -> X; any other type as it is."""
    if typing.get_origin(tp) is typing.Union:
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _coerce(tp, value: Any, key: str, source: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    def bad():  # formatted only when raised: the value may be a huge (aliased) structure
        return UserError(f"{source}: {key} should be {_type_name(tp)}, got {one_line_value(value)}")
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = non_null(tp)
        try:
            return _coerce(inner, value, key, source)
        except UserError:
            if typing.get_origin(inner) in (list, List, dict, Dict) and isinstance(value, (list, tuple, dict)):
                raise  # an element's own message names it
            raise bad() from None  # "... or null"
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise bad()
        return [_coerce(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise bad()
        return {str(k): _coerce(args[1], v, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    raise TypeError(f"unsupported config type {tp}")


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        return f"{_type_name(non_null(tp))} or null"
    if origin in (list, List):
        return f"a list of {_type_name(args[0])}"
    if origin in (dict, Dict):
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))
