"""What the three entry scripts share: config + flag overrides, logging, and the error boundary."""
import argparse
import logging
import sys
from contextlib import nullcontext
from typing import Callable, Dict, Optional, Sequence, Union

from tqdm import tqdm

from utils.config import CHOICES, Config, load_config, override
from utils.errors import UserError, one_line
from utils.runtime import keep_freed_memory

log = logging.getLogger("dlsr")


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging(is_main: bool) -> None:
    """Rank 0 logs INFO; other ranks only warnings and errors."""
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False


def add_common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data_path", help="root of the datasets (default: the config's data_path, ./data)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--cache_dir", help="feature cache folder (default: <data_path>/feature_cache)")
    p.add_argument("--backbone_weights", help="ImageNet weights file of the backbone")
    p.add_argument("--num_workers", type=int, help="image decoding worker processes")
    p.add_argument("--no_amp", action="store_true", help="no fp16 autocast on CUDA (fp32 throughout)")
    p.add_argument("--precision", choices=CHOICES["precision"],
                   help="CPU arithmetic: fp32 (exact, default) or bf16 autocast (opt-in; CPUs with native bf16 only)")
    p.add_argument("--channels_last", action="store_true", help="channels-last convolutions (opt-in; other rounding)")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config value, e.g. --opt lfdn.num_res_blocks=8 (repeatable)")


COMMON_FLAGS = {"data_path": "data_path", "device": "device", "cache_dir": "cache_dir",
                "backbone_weights": "backbone.weights", "num_workers": "num_workers"}


def resolve_config(config: Union[str, Config], args: argparse.Namespace, flags: Dict[str, str]) -> Config:
    """Load the YAML (or take ``config`` as it is), then apply ``--opt KEY=VALUE`` and the named flags (flags win)."""
    cfg = load_config(config) if isinstance(config, str) else config
    for item in args.opt:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--opt expects KEY=VALUE, got {item!r}")
        override(cfg, key.strip(), value)
    for flag, key in {**COMMON_FLAGS, **flags}.items():
        value = getattr(args, flag, None)
        if value is not None:
            override(cfg, key, value, source=f"--{flag}")
    if args.no_amp:
        cfg.amp = False
    if getattr(args, "precision", None):
        override(cfg, "precision", args.precision, source="--precision")
    if getattr(args, "channels_last", False):
        cfg.channels_last = True
    return cfg


def run_entry(main: Callable[[Optional[Sequence[str]]], None], argv: Optional[Sequence[str]] = None) -> None:
    """Run ``main``; a UserError becomes one line on stderr and exit status 2, Ctrl-C exit status 130."""
    keep_freed_memory()
    try:
        main(argv)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; files already written are complete, nothing half-written was left", file=sys.stderr)
        sys.exit(130)


EVAL_FLAGS = {"similarity_type": "eval.similarity_type", "dataset": "eval.dataset", "fpr95": "eval.fpr95"}


def add_eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pretrained_ldm_cfg", default="config/Config.yaml",
                   help="the config the checkpoint(s) were trained with (default: %(default)s)")
    add_common_flags(p)
    p.add_argument("--evaluate", action="store_true", help="accepted for compatibility with the release; "
                   "evaluating is what this script does")
    p.add_argument("--similarity_type", choices=CHOICES["eval.similarity_type"],
                   help="headline score (default: the config's eval.similarity_type)")
    p.add_argument("--dataset", help="ID test set spec (default: config eval.dataset)")
    p.add_argument("--ood", action="append", default=[], metavar="NAME=SPEC",
                   help="OOD set, repeatable; replaces the config's list, e.g. --ood SVHN=svhn --ood Tex=folder:dtd/images")
    p.add_argument("--skip_missing", action="store_true", help="go on without OOD sets that are not on disk")
    p.add_argument("--output_dir", help="where results go (default: results-<name> beside the checkpoint)")
    p.add_argument("--save_features", action="store_true", help="also save features/NAME.npy (standardised vectors)")
    p.add_argument("--no_plots", action="store_true", help="skip the ROC and histogram PNGs")
    add_score_flags(p)
    p.add_argument("--fpr95", choices=CHOICES["eval.fpr95"], help="FPR95 convention (default: the config's eval.fpr95)")
    p.add_argument("--group", action="append", default=[], metavar="NAME=near|far",
                   help="put an OOD set in the near or far group (repeatable; adds near/far mean rows)")
    p.add_argument("--baselines", metavar="LIST", help="also score every set with baselines on the same features: "
                   "knn, mahalanobis, or knn,mahalanobis (default: the config's eval.baselines)")
    p.add_argument("--knn_k", metavar="LIST", help="kNN's k values, e.g. 1,50 (default: the config's eval.knn_k)")


SCORE_FLAGS = {"seed": "eval.seed", "batch_size": "eval.batch_size", "mfsim_layers": "eval.mfsim_layers",
               "subset_timesteps_num": "diffusion.subset_timesteps_num", "eta": "diffusion.eta",
               "indexing": "diffusion.indexing"}


def add_score_flags(p: argparse.ArgumentParser) -> None:
    """The flags that set how images are scored (evaluation and predict.py); defaults come from the config."""
    p.add_argument("--subset_timesteps_num", type=int, help="noise level k = number of DDIM steps "
                   "(default: the config's diffusion.subset_timesteps_num)")
    p.add_argument("--eta", type=float, help="DDIM eta (default: the config's diffusion.eta)")
    p.add_argument("--indexing", choices=CHOICES["diffusion.indexing"], help="DDIM indexing (default: the config's)")
    p.add_argument("--batch_size", type=int, help="vectors per reconstruction batch, a speed setting "
                   "(default: the config's eval.batch_size)")
    p.add_argument("--seed", type=int, help="noise seed (default: the config's eval.seed)")
    p.add_argument("--mfsim_layers", choices=CHOICES["eval.mfsim_layers"],
                   help="release: skip layer 0; all: the paper's formula (default: the config's)")


def eval_config(args: argparse.Namespace) -> Config:
    cfg = resolve_config(args.pretrained_ldm_cfg, args, {**EVAL_FLAGS, **SCORE_FLAGS})
    if args.ood:
        ood = {}
        for item in args.ood:
            name, sep, spec = item.partition("=")
            if not sep or not name or not spec:
                raise UserError(f"--ood expects NAME=SPEC, e.g. SVHN=svhn, got {item!r}")
            if name in ood:
                raise UserError(f"--ood names the set {name!r} twice ({ood[name]!r} and {spec!r}); give each set its own name")
            ood[name] = spec
        override(cfg, "eval.groups", {n: g for n, g in cfg.eval.groups.items() if n in ood}, source="--ood")
        override(cfg, "eval.ood", ood, source="--ood")
    if args.group:
        groups = dict(cfg.eval.groups)
        for item in args.group:
            name, sep, group = item.partition("=")
            if not sep:
                raise UserError(f"--group expects NAME=near or NAME=far, got {item!r}")
            groups[name] = group
        override(cfg, "eval.groups", groups, source="--group")
    if args.baselines is not None:
        override(cfg, "eval.baselines", [b.strip() for b in args.baselines.split(",") if b.strip()], source="--baselines")
    if args.knn_k is not None:
        try:
            ks = [int(k) for k in args.knn_k.split(",")]
        except ValueError:
            raise UserError(f"--knn_k expects integers like 1,50, got {args.knn_k!r}") from None
        override(cfg, "eval.knn_k", ks, source="--knn_k")
    return cfg


def run_evaluation(args: argparse.Namespace, checkpoints: Dict[str, str], default_output_dir: str) -> None:
    """Score, write every output (rank 0), print the table."""
    from utils.distributed import distributed_context
    from utils.evaluation import Scorer
    from utils.report import format_markdown, write_outputs

    from utils.distributed import stop_unless_main_agrees
    from utils.report import check_output_dir, output_lock

    cfg = eval_config(args)
    out = args.output_dir or default_output_dir
    with distributed_context(cfg.device) as ctx:
        setup_logging(ctx.is_main)
        stop_unless_main_agrees(lambda: check_output_dir(out, cfg.feature_cache_dir), ctx)
        with output_lock(out) if ctx.is_main else nullcontext():
            scorer = Scorer.from_checkpoints(cfg, ctx, checkpoints, args.pretrained_ldm_cfg)
            result = scorer.evaluate(args.skip_missing, args.save_features)
            if ctx.is_main:
                write_outputs(result, out, args.save_features, plots=not args.no_plots)
                print(format_markdown(result))
                log.info("results written to %s", out)
