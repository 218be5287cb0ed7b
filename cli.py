"""What the entry scripts share: flags made from the config, config + flag overrides, the config a
checkpoint is scored with (experiment/run.py), logging, and the error boundary."""
import argparse
import logging
import re
import sys
import typing
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import yaml

from datasets import known_specs
from errors import Preempted, UserError, one_line
from experiment.config import (CHOICES, DEFAULT_CONFIG, Config, choices, config_from_dict, field_of, field_type,
                               load_config, non_null, override, parse_value, value_at)
from experiment.run import RunConfig, default_config_path, run_config
from store.checkpoint import load_checkpoint, stored_config
from utils.distributed import launched_as_main
from utils.progress import setup_logging
from utils.runtime import keep_freed_memory

log = logging.getLogger("dlsr")


# The config keys each kind of script takes as flags. Name, type, help text and allowed values come
# from the config's fields (experiment/config.py); --help adds the value the config in use sets.
COMMON_FLAGS = ("data_path", "device", "cache_dir", "backbone.weights", "num_workers", "amp", "precision",
                "channels_last")
SCORE_FLAGS = ("diffusion.subset_timesteps_num", "diffusion.eta", "diffusion.indexing", "eval.batch_size",
               "eval.seed", "eval.mfsim_layers", "eval.noise_draws", "eval.layer_norm")
TRAIN_FLAGS = ("train.dataset", "train.subset", "train.batch_size", "train.epochs", "train.accum_iter", "train.lr",
               "train.blr", "train.min_lr", "train.cosine_lr", "train.warmup_epochs", "train.weight_decay",
               "train.seed", "train.save_every", "output_dir", "log_dir", "train.cache_features")
SPEC_KEYS = ("train.dataset", "eval.dataset", "eval.ood")  # flags whose values are data set specs
EVAL_FLAGS = ("eval.dataset", "eval.ood", "eval.groups", "eval.similarity_type", "eval.fpr95", "eval.baselines",
              "eval.knn_k")


def flag_name(key: str) -> str:
    return field_of(key).metadata.get("flag") or key.rsplit(".", 1)[-1]


def add_config_flags(p: argparse.ArgumentParser, keys: Sequence[str]) -> None:
    """One flag per config key, made from the field: a switch for a bool (it sets the field's ``const``),
    a repeatable NAME=VALUE for a mapping, a comma-separated list for a list, else the field's type."""
    for key in keys:
        meta, tp = field_of(key).metadata, non_null(field_type(key))
        origin = typing.get_origin(tp)
        kw = {"default": None, "help": _escape(meta["help"])}
        if tp is bool:
            if meta["const"] is None:
                raise TypeError(f"config field {key} needs const= (the value its switch sets) to be a flag")
            kw.update(action="store_const", const=meta["const"])
            kw["help"] += f" (sets {key}: {_shown(meta['const'])})"
        elif origin is dict:
            kw.update(action="append", metavar=meta["metavar"] or "NAME=VALUE")
        elif origin is list:
            kw.update(metavar=meta["metavar"] or "LIST")
        else:
            kw.update(type=tp, metavar=meta["metavar"] or key.rsplit(".", 1)[-1].upper())
        if key in SPEC_KEYS:  # the kinds of data set spec, from the registry
            kw["help"] += f" (kinds: {', '.join(known_specs())})"
        if key in CHOICES:
            if origin in (dict, list):
                kw["help"] += f" (each of {', '.join(choices(key))})"
            else:
                kw.update(choices=choices(key), metavar=None)
        action = p.add_argument(f"--{flag_name(key)}", **kw)
        action.config_key = key
        p.config_actions = [*getattr(p, "config_actions", []), action]


def add_common_flags(p: argparse.ArgumentParser) -> None:
    add_config_flags(p, COMMON_FLAGS)
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config value, e.g. --opt lfdn.num_res_blocks=8 (repeatable)")


def parse_with_config(p: argparse.ArgumentParser, argv: Optional[Sequence[str]],
                      config_in_use: Callable[[Optional[Sequence[str]]], Tuple[Config, str]]) -> argparse.Namespace:
    """Parse ``argv``; --help shows, beside each config flag, the value that the config the run will use
    sets (``config_in_use(argv)`` -> (that config, where it comes from))."""
    cfg, source = config_in_use(argv)
    accept_negative_numbers(p)
    for action in getattr(p, "config_actions", []):
        action.help += _escape(f" [{source}: {_shown(value_at(cfg, action.config_key))}]")
    p.epilog = ("[FILE: VALUE] is what the config in use sets; a flag given overrides it, and --opt KEY=VALUE "
                "overrides any config value.")
    return p.parse_args(argv)


NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
ARGPARSE_READS_EXPONENTS = sys.version_info >= (3, 14)


def accept_negative_numbers(p: argparse.ArgumentParser) -> None:
    """Let ``--lr -1e-4`` reach the value checks ("must be in [0, inf)") instead of argparse's "expected
    one argument": before Python 3.14, argparse takes "-1e-4" for a flag, as its number pattern has no
    exponent. It keeps that pattern in a private attribute, set here to one with exponents; from 3.14
    on argparse reads these numbers itself (and more: "-1_000"), and is left alone."""
    if not ARGPARSE_READS_EXPONENTS:
        p._negative_number_matcher = NEGATIVE_NUMBER


def flag_values(argv: Optional[Sequence[str]], **defaults) -> argparse.Namespace:
    """Just the named flags of ``argv`` (the rest ignored): where the config comes from, before parsing."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for name, default in defaults.items():
        pre.add_argument(f"--{name}", default=default)
    return pre.parse_known_args(argv)[0]


def yaml_named_by(flag: str) -> Callable[[Optional[Sequence[str]]], Tuple[Config, str]]:
    """For ``parse_with_config``: the config is the YAML that --``flag`` names (default: DEFAULT_CONFIG)."""
    return lambda argv: yaml_in_use(getattr(flag_values(argv, **{flag: DEFAULT_CONFIG}), flag))


def config_for_checkpoint(given: Optional[str], ckpt_path: Optional[str]) -> Tuple[Union[str, Config], str]:
    """For --help: (the config a run scoring ``ckpt_path`` starts from, the words naming it): the YAML
    given, else the config stored in our checkpoint, else (the authors' files store none)
    config/Config.yaml, as ``experiment.run.run_config`` chooses."""
    if given:
        return given, given
    stored = stored_config(ckpt_path)
    if stored is not None:
        where = f"the config stored in {ckpt_path}"
        return config_from_dict(stored, source=where), where
    return default_config_path(), default_config_path()


def scoring_run(checkpoints: Dict[str, str], given: Optional[str], flags: Mapping[str, Any],
                keys: Sequence[str]) -> RunConfig:
    """The run that scores ``checkpoints`` ({role: path}): each loaded, the config ``given`` (else the
    end checkpoint's stored one) with the command line's ``flags`` for ``keys`` on top, and what the
    run is taken from the checkpoint (``experiment.run.run_config``; one line per value it overrides)."""
    ckpts = {role: load_checkpoint(path) for role, path in checkpoints.items()}
    return run_config(ckpts, given, lambda cfg: resolve_config(cfg, flags, keys), say=launched_as_main())


def stored_or_named(cfg_flag: str, ckpt_flag: str, ckpt_default: str) -> Callable[[Any], Tuple[Config, str]]:
    """For ``parse_with_config``: --``cfg_flag`` if given, else the config stored in --``ckpt_flag``."""
    def in_use(argv):
        values = flag_values(argv, **{cfg_flag: None, ckpt_flag: ckpt_default})
        try:
            config, where = config_for_checkpoint(getattr(values, cfg_flag), getattr(values, ckpt_flag))
        except UserError:
            return Config(), "built-in; the checkpoint's stored config is invalid"
        return yaml_in_use(config) if isinstance(config, str) else (config, where)
    return in_use


def yaml_in_use(path: str) -> Tuple[Config, str]:
    """The config at ``path``, or the built-in defaults where it cannot be read (the run then says why)."""
    try:
        return load_config(path), path
    except UserError:
        return Config(), f"built-in; {path} unreadable"


def resolve_config(config: Union[str, Config], flags: Mapping[str, Any], keys: Sequence[str]) -> Config:
    """Load the YAML (or take ``config`` as it is), then apply ``flags`` (the parsed flags by name,
    ``vars(args)``): ``opt`` (KEY=VALUE items), then the flags of COMMON_FLAGS and ``keys`` (flags win)."""
    cfg = load_config(config) if isinstance(config, str) else config
    for item in flags.get("opt") or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--opt expects KEY=VALUE, got {item!r}")
        override(cfg, key.strip(), value)
    for key in (*COMMON_FLAGS, *keys):
        name = flag_name(key)
        value = flags.get(name)
        if value is None:
            continue
        origin = typing.get_origin(non_null(field_type(key)))
        if origin is dict:
            value = _pairs(value, name, field_of(key).metadata["metavar"])
            if field_of(key).metadata["merge"]:
                value = {**value_at(cfg, key), **value}
        elif origin is list:
            value = [parse_value(item) for item in (v.strip() for v in value.split(",")) if item]
        override(cfg, key, value, source=f"--{name}")
    return cfg


def _pairs(items: Sequence[str], name: str, metavar: str) -> dict:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise UserError(f"--{name} expects {metavar}, got {item!r}")
        if key in pairs:
            raise UserError(f"--{name} names {key!r} twice ({pairs[key]!r} and {value!r}); give each its own name")
        pairs[key] = value
    return pairs


def _shown(value) -> str:
    """A config value as it would be written on the command line (null for None, lists comma-separated)."""
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items()) or "none"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "none"
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _escape(text: str) -> str:
    return text.replace("%", "%%")


def run_entry(main: Callable[[Optional[Sequence[str]]], None], argv: Optional[Sequence[str]] = None) -> None:
    """Run ``main``; a UserError becomes one line on stderr and exit status 2 (143 for a preemption that
    saved), Ctrl-C exit status 130. Rank 0 (or the one process) logs INFO lines, other ranks warnings."""
    keep_freed_memory()
    setup_logging(launched_as_main())
    try:
        main(argv)
    except Preempted as e:
        print(f"stopped: {one_line(e)}", file=sys.stderr)
        sys.exit(e.exit_code)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted; files already written are complete, nothing half-written was left", file=sys.stderr)
        sys.exit(130)


def add_eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pretrained_ldm_cfg", metavar="FILE",
                   help=f"the config the checkpoint(s) were trained with (default: the one stored in our "
                        f"checkpoint; {DEFAULT_CONFIG} for the authors' files, which store none)")
    add_common_flags(p)
    p.add_argument("--evaluate", action="store_true", help="accepted for compatibility with the release; "
                   "evaluating is what this script does")
    add_config_flags(p, EVAL_FLAGS)
    p.add_argument("--skip_missing", action="store_true", help="go on without OOD sets that are not on disk")
    p.add_argument("--output_dir", metavar="PATH", help="where results go (default: results-<name> beside the checkpoint)")
    p.add_argument("--save_features", action="store_true", help="also save features/NAME.npy (standardised vectors)")
    p.add_argument("--no_plots", action="store_true", help="skip the ROC and histogram PNGs")
    add_config_flags(p, SCORE_FLAGS)
