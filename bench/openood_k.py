"""Choose k (``diffusion.subset_timesteps_num``) the way OpenOOD chooses hyperparameters: on its
validation lists, never on the test lists; then evaluate the test sets at that k.

    python bench/openood_k.py --checkpoint checkpoint/openood_cifar10/checkpoint-last.pth \
        --data_path OPENOOD_ROOT [--ks 1,2,3,5,10] [--output_dir results-openood-k]

For each k: the headline score's AUROC of the ID validation list (``openood:BENCH``, split val:
val_BENCH.txt) against the OOD validation list (``openood:BENCH/val``). The best k (the smallest
of a tie) is used for the test evaluation of the config's sets, written as test_mse_mfsim.py writes
it (openood.csv included) to --output_dir, beside choose_k.json (every k's validation AUROC).
The config is the checkpoint's own (or --config); its eval.dataset must be an openood: ID set.
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from datasets import build_dataset  # noqa: E402
from errors import UserError  # noqa: E402
from store.atomic import atomic_write_text  # noqa: E402
from store.checkpoint import load_checkpoint  # noqa: E402
from cli import resolve_config, run_entry  # noqa: E402
from utils.distributed import distributed_context  # noqa: E402
from engine.evaluation import run_evaluation  # noqa: E402
from engine.scorer import Scorer  # noqa: E402
from models.diffusion import largest_k  # noqa: E402
from experiment.run import run_config  # noqa: E402
from scoring.metrics import ood_metrics  # noqa: E402
from utils.precision import exact_fp32  # noqa: E402
from utils.progress import setup_logging  # noqa: E402


def parse_ks(text: str) -> list:
    try:
        ks = sorted({int(k) for k in text.split(",") if k.strip()})
    except ValueError:
        ks = []
    if not ks or min(ks) < 1:
        raise UserError(f"--ks: give positive integers, e.g. 1,2,3,5,10; got {text!r}")
    return ks


def validation_sets(cfg):
    """(ID validation set, OOD validation set) of the config's openood: ID set."""
    spec = cfg.eval.dataset
    base = spec.split("@")[0]
    if not base.startswith("openood:") or "/" in base:
        raise UserError(f"eval.dataset is {spec!r}: choosing k on OpenOOD's validation lists needs an "
                        f"openood:BENCH ID set (config/openood_*.yaml)")
    return (build_dataset(spec, "val", cfg.data_path, cfg.backbone.input_size, cfg.download),
            build_dataset(f"{base}/val", "test", cfg.data_path, cfg.backbone.input_size, cfg.download))


def validation_aurocs(run, ks) -> dict:
    """{k: the headline score's validation AUROC (a fraction)}; every rank gets it."""
    aurocs = {}
    with distributed_context(run.cfg.device) as ctx, exact_fp32(ctx.device):
        setup_logging(ctx.is_main)
        scorer = Scorer.from_checkpoints(run, ctx)
        id_val, ood_val = validation_sets(scorer.cfg)
        fi = scorer.set_features(id_val, split="val", desc="ID validation: features")
        fo = scorer.set_features(ood_val, desc="OOD validation: features")
        headline = scorer.fields()[0]
        for k in ks:
            scorer.cfg.diffusion.subset_timesteps_num = k
            scorer._layer_stats.clear()  # eval.layer_norm's statistics depend on k
            s_id = scorer.scores(fi.z, fi.keys, shared=True)[headline]
            s_ood = scorer.scores(fo.z, fo.keys, shared=True)[headline]
            aurocs[k] = ood_metrics(s_id, s_ood)["AUROC"]
            if ctx.is_main:
                print(f"k = {k}: validation AUROC ({headline}) {100 * aurocs[k]:.2f}", flush=True)
    return aurocs


def best_k(aurocs: dict) -> int:
    """The k of the highest validation AUROC; of equal ones, the smallest k (the least noise)."""
    return max(aurocs, key=lambda k: (aurocs[k], -k))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, metavar="FILE")
    p.add_argument("--config", metavar="FILE", help="default: the config stored in the checkpoint")
    p.add_argument("--data_path", metavar="PATH", help="OpenOOD's data root")
    p.add_argument("--cache_dir", metavar="PATH")
    p.add_argument("--device")
    p.add_argument("--ks", default="1,2,3,5,10", help="k values to try (default: %(default)s)")
    p.add_argument("--output_dir", default="results-openood-k", metavar="PATH")
    args = p.parse_args(argv)
    ks = parse_ks(args.ks)
    flags = {"data_path": args.data_path, "cache_dir": args.cache_dir, "device": args.device}
    run = run_config({"end": load_checkpoint(args.checkpoint)}, args.config, lambda c: resolve_config(c, flags, ()))
    cfg = run.cfg
    top = largest_k(cfg.diffusion.timesteps, cfg.diffusion.indexing)
    if max(ks) > top:
        raise UserError(f"--ks: k must be in 1..{top} with {cfg.diffusion.indexing} indexing, got {max(ks)}")
    aurocs = validation_aurocs(run, ks)
    best = best_k(aurocs)
    cfg.diffusion.subset_timesteps_num = best
    result = run_evaluation(run, args.output_dir)
    if result is not None:
        chosen = {"chosen_k": best, "validation_auroc": {str(k): v for k, v in aurocs.items()},
                  "id_validation": f"{cfg.eval.dataset} (val)", "ood_validation": f"{cfg.eval.dataset.split('@')[0]}/val",
                  "score": result.headline}
        atomic_write_text(os.path.join(args.output_dir, "choose_k.json"), json.dumps(chosen, indent=2))
        print(f"chosen k = {best} (validation AUROC {100 * aurocs[best]:.2f}); test results in {args.output_dir}")


if __name__ == "__main__":
    run_entry(main)
