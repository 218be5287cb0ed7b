"""Scoring new image files with calibrated verdicts: the engine of ``predict.py``.

Files are decoded a chunk at a time (``eval.batch_size`` files), so memory does not grow with
their number; under torchrun the ranks take the chunks round-robin, each writes its rows to a
part file, and rank 0 merges them into the CSV in path order. A file that cannot be decoded
never stops the run: it gets a row with empty scores and the reason.
"""
import csv
import glob
import json
import logging
import math
import os
import re
import shutil
import stat
import sys
from contextlib import contextmanager, nullcontext
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from datasets import build_dataset
from datasets.images import list_images, read_text_lines, to_rgb_resized
from engine.evaluation import meta
from engine.extraction import features_tag, loader_for
from engine.scorer import Scorer
from errors import UserError
from experiment.run import RunConfig
from models.features import weights_digest
from scoring.scores import score_types
from store.atomic import atomic_file, atomic_write_text
from store.rundir import keyed_path, lock_beside, output_file_problem, outputs_problem
from utils.distributed import (agreed_record, barrier, block_rows, broadcast_from, distributed_context, shared_token,
                               stop_unless_main_agrees)
from utils.loader import decoded
from utils.precision import exact_fp32
from utils.progress import progress

log = logging.getLogger("dlsr")
DEFAULT_TPR = 0.95  # the fraction of ID calibration images a threshold accepts, unless told
CALIBRATION_VERSION = 2  # 2: the score list is part of the key
STDOUT = "-"  # --output - : the CSV to standard output, the summary line to standard error, no JSON
# The CSV is UTF-8; a file name that is not (any bytes are a valid name on Linux) is written as the
# OS's bytes, so that csv.reader over open(path, newline="", encoding="utf-8", errors="surrogateescape")
# gives back the very name Python's os functions give (docs/USAGE.md).
NAMES_AS_GIVEN = {"encoding": "utf-8", "errors": "surrogateescape"}


def collect_files(paths: Sequence[str], lists: Optional[List[str]] = None) -> List[str]:
    """The files that PATH arguments name, sorted, each file once (two spellings of one file, such as
    ``dir/a.png`` and ``dir/./a.png``, give one row: the first spelling in sort order).

    A PATH is an image file (kept whatever its name, so that an unreadable one gets a row), a
    folder (every file with an image extension below it, links followed, each real folder once) or
    ``@list.txt`` (one PATH per line, read as if given on the command line; blank lines and lines
    starting with # are skipped; UTF-8 with or without a byte-order mark, and bytes that are not are kept as the OS's file-name bytes;
    a list that names itself, or a list it is inside of, is read once). ``lists`` receives the lists read.
    """
    files = set()
    _collect(paths, files, lists if lists is not None else [], reading=())
    if not files:
        raise UserError(f"no image files found in {', '.join(repr(p) for p in paths)}")
    unique = {}
    for f in sorted(files):
        unique.setdefault(os.path.realpath(f) if os.path.exists(f) else os.path.normpath(f), f)
    return sorted(unique.values())


def _collect(paths: Sequence[str], files: set, lists: List[str], reading: tuple) -> None:
    for p in paths:
        if p.startswith("@"):
            path = p[1:]
            real = os.path.realpath(path)
            if real in reading:
                log.warning("the file list %r names itself (or a list it is read from); read once", path)
                continue
            try:
                entries = [line.strip(" \t\r\n") for line in read_text_lines(path)]
            except OSError as e:
                raise UserError(f"cannot read the file list {path!r}: {e.strerror or e}") from None
            lists.append(path)
            _collect([e for e in entries if e and not e.startswith("#")], files, lists, (*reading, real))
        elif os.path.isdir(p):
            files |= set(list_images(p))
        else:
            files.add(p)


class FileImages(Dataset):
    """Decoded, resized files; item i is (uint8 (S, S, 3) tensor or None, reason it could not be decoded)."""

    def __init__(self, files: Sequence[str], image_size: int):
        self.files, self.image_size = list(files), image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        path = self.files[i]
        if not os.path.exists(path):
            return None, "no such file"
        if os.path.isdir(path):
            return None, "a folder, not an image file"
        kind = os.stat(path).st_mode
        if not stat.S_ISREG(kind):  # never opened: reading a FIFO or a device would block or never end
            what = "a FIFO" if stat.S_ISFIFO(kind) else "a socket" if stat.S_ISSOCK(kind) else "a device"
            return None, f"not a regular file ({what})"
        try:
            with Image.open(path) as img:
                img.load()
                return to_rgb_resized(img, self.image_size), ""
        except Exception as e:  # zero bytes, truncated, not an image, unsupported mode: a row, never a crash
            detail = str(e).replace(f"'{path}'", "").replace(path, "").strip(" :") or e.__class__.__name__
            return None, f"cannot decode: {detail.splitlines()[0]}"


def csv_columns() -> tuple:
    """predict.py's CSV columns: the path, one column per score of the registry, the verdict, the error."""
    return ("path", *score_types(), "is_ood", "error")


def _as_list(batch):
    return batch


def calibration_key(scorer: Scorer, spec: str, dataset, tpr: float) -> dict:
    cfg, d = scorer.cfg, scorer.cfg.diffusion
    return {"version": CALIBRATION_VERSION, "checkpoint": weights_digest(scorer.models["end"].state_dict()),
            "backbone": scorer.backbone.identity, "input_size": scorer.backbone.input_size, "scores": score_types(),
            "precision": features_tag(scorer.mode, scorer.extractor, scorer.ctx.device), "set": spec,
            "set_identity": dataset.identity(),
            "k": d.subset_timesteps_num, "eta": d.eta, "indexing": d.indexing, "seed": cfg.eval.seed,
            "mfsim_layers": cfg.eval.mfsim_layers, "noise_draws": cfg.eval.noise_draws,
            "layer_norm": cfg.eval.layer_norm, "tpr": tpr}


def thresholds_at(scores: Dict[str, np.ndarray], tpr: float) -> Dict[str, float]:
    """Per score type, the threshold that accepts (score <= threshold) a fraction ``tpr`` of these ID scores."""
    return {t: float(np.quantile(s, tpr)) for t, s in scores.items()}


MIN_ABOVE = 5  # calibration images above the threshold for its quantile to mean something


def warn_if_few(n: int, tpr: float, what: str) -> None:
    """Say so when ``n`` calibration images are too few for the ``tpr`` quantile (fewer than MIN_ABOVE above it)."""
    if n * (1 - tpr) < MIN_ABOVE:
        log.warning("%s: %d calibration image(s) are few for a threshold that accepts %g of them: the quantile "
                    "falls between %d score(s); %d or more give it %d images above", what, n, tpr, n,
                    math.ceil(MIN_ABOVE / (1 - tpr)), MIN_ABOVE)


def calibrate(scorer: Scorer, spec: str, tpr: float) -> dict:
    """Thresholds from the calibration set ``spec``, computed once and kept in the feature cache folder
    (the ranks agree on it as on a feature cache file: ``agreed_record``).

    Returns {"thresholds": {score: value}, "images": n, "set": spec, "tpr": tpr, "from": "record" | "computed"}.
    """
    cfg, ctx = scorer.cfg, scorer.ctx
    dataset = build_dataset(spec, "test", cfg.data_path, cfg.backbone.input_size, cfg.download)
    key = calibration_key(scorer, spec, dataset, tpr)
    path = keyed_path(cfg.feature_cache_dir, "calibration", key, ".json")

    def share(own, src: int) -> dict:
        slots = [(f, t) for f in ("thresholds", "accepted") for t in score_types()]  # one number each, in order
        values = torch.tensor([float(own[f][t]) if own else 0.0 for f, t in slots], dtype=torch.float64)
        values = broadcast_from(values, src, ctx).cpu().tolist()
        record = {"key": key, "thresholds": {}, "accepted": {}, "images": len(dataset)}
        for (f, t), v in zip(slots, values):
            record[f][t] = v if f == "thresholds" else int(v)
        return record

    def compute() -> dict:
        feats = scorer.set_features(dataset, desc="calibration: features")
        scores = scorer.scores(feats.z, feats.keys, desc="calibration: ", shared=True)
        thresholds = thresholds_at(scores, tpr)
        if ctx.is_main:
            warn_if_few(len(dataset), tpr, f"calibration on {spec}")
        return {"key": key, "thresholds": thresholds, "images": len(dataset),
                "accepted": {t: int((scores[t] <= thresholds[t]).sum()) for t in score_types()}}

    record, held = agreed_record(ctx, path, lambda: _read_record(path, key), share, compute,
                                 lambda rec: atomic_write_text(path, json.dumps(rec, indent=2)))
    return {**_public(record, spec, tpr), "from": "record" if held else "computed"}


def _public(record: dict, spec: str, tpr: float) -> dict:
    return {"thresholds": record["thresholds"], "images": record["images"], "accepted": record["accepted"], "set": spec,
            "tpr": tpr}


def _read_record(path: str, key: dict):
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    # JSON makes the key's tuples lists: compare as JSON does
    return record if isinstance(record, dict) and record.get("key") == json.loads(json.dumps(key)) and \
        "accepted" in record else None


def predict_files(scorer: Scorer, files: List[str], thresholds: Dict[str, float], score: str, output: str) -> dict:
    """Score ``files`` and write the CSV (rank 0); return the counts {"images", "scored", "flagged", "unreadable"}."""
    cfg, ctx = scorer.cfg, scorer.ctx
    # A chunk holds whole backbone and reconstruction batches, so that files go through both in the
    # same groups as the same folder does in test_mse_mfsim.py: the same scores to the bit.
    chunk = math.lcm(cfg.eval.batch_size, cfg.extract_batch_size)
    if ctx.is_main:  # part files of an earlier run on this output that was killed (-9): under the lock, stale
        for stale in glob.glob(glob.escape(output) + ".part-*"):
            if re.fullmatch(r"\.part-[0-9a-f]+-\d+", stale[len(output):]):  # ours; other files are left alone
                os.remove(stale)
    token = shared_token(ctx)  # a collective: no rank writes its part before the stale ones are gone
    parts = [f"{output}.part-{token}-{r}" for r in range(ctx.world_size)]  # this run's alone
    part = parts[ctx.rank]
    mine = Subset(FileImages(files, cfg.backbone.input_size), block_rows(len(files), chunk, ctx.rank,
                                                                          ctx.world_size).tolist())
    loader = loader_for(cfg, ctx, mine, chunk, collate_fn=_as_list)
    scorer.prepare()  # every rank, before the chunks: a rank may get none
    try:
        with open(part, "w", newline="", **NAMES_AS_GIVEN) as f:
            w = csv.writer(f)  # "\r\n" rows (RFC 4180): a name holding "\r" or "\n" is quoted whole
            start = 0
            chunks = progress(decoded(loader), "scoring", ctx.is_main, total=len(loader), unit="chunk")
            for j, items in enumerate(chunks):
                names = [files[i] for i in mine.indices[start:start + len(items)]]
                start += len(items)
                good = [i for i, (img, _) in enumerate(items) if img is not None]
                scores = {}
                if good:
                    z, keys = scorer.image_features(torch.stack([items[i][0] for i in good]))
                    scores = scorer.scores(z, keys)
                at = {i: n for n, i in enumerate(good)}
                for i, (name, (_, err)) in enumerate(zip(names, items)):
                    if i in at:
                        values = {t: float(scores[t][at[i]]) for t in score_types()}
                        w.writerow([name, *(repr(v) for v in values.values()),
                                    int(values[score] > thresholds[score]), ""])
                    else:
                        w.writerow([name, *("" for _ in score_types()), "", err])
        barrier(ctx)
        counts = _merge(files, chunk, parts, output) if ctx.is_main else {}
        barrier(ctx)
    finally:
        if os.path.exists(part):
            os.remove(part)
    return counts


def _merge(files: List[str], chunk: int, parts: List[str], output: str) -> dict:
    """Interleave the ranks' part files chunk by chunk into ``output`` (atomically); count the rows."""
    n, world = len(files), len(parts)
    counts = {"images": n, "scored": 0, "flagged": 0, "unreadable": 0}
    readers = [open(p, newline="", **NAMES_AS_GIVEN) for p in parts]
    try:
        rows = [csv.reader(r) for r in readers]
        with atomic_file(output, "w", newline="", **NAMES_AS_GIVEN) as out:
            w = csv.writer(out)
            w.writerow(csv_columns())
            for j in range(-(-n // chunk)):
                for _ in range(min(chunk, n - j * chunk)):
                    row = next(rows[j % world])
                    w.writerow(row)
                    if row[-1]:
                        counts["unreadable"] += 1
                    else:
                        counts["scored"] += 1
                        counts["flagged"] += int(row[-2])
    finally:
        for r in readers:
            r.close()
    return counts


def prediction_outputs_problem(output: str, summary_path: str, inputs: Sequence[str]) -> Optional[str]:
    """Why predict.py may not write its CSV ``output`` and the summary beside it (None if it may)."""
    if os.path.splitext(output)[1].lower() == ".json":
        return (f"--output {output!r} names the CSV, and the summary goes beside it as NAME.json: give the CSV "
                f"another extension (e.g. {os.path.splitext(output)[0] + '.csv'!r})")
    return output_file_problem(output, "--output", summary_path) or outputs_problem(
        {"--output": output, "its summary": summary_path}, inputs, _ours)


def _ours(what: str, path: str) -> bool:
    """Whether ``path`` is a CSV or a summary that predict.py wrote (those it may replace)."""
    try:
        with open(path, newline="", **NAMES_AS_GIVEN) as f:
            if what == "--output":
                return next(csv.reader(f), None) == list(csv_columns())
            summary = json.load(f)
    except (OSError, ValueError, csv.Error):
        return False
    return isinstance(summary, dict) and {"checkpoint", "counts", "csv"} <= set(summary)


def run_prediction(run: RunConfig, files: List[str], output: str, *, tpr: float, score: str, calibration_set: str,
                   inputs: Sequence[str] = ()) -> Optional[dict]:
    """predict.py's whole run: check and lock ``output``, calibrate on ``calibration_set``, score
    ``files``, write the CSV and the summary JSON beside it (rank 0), print one line. Returns the
    summary on rank 0. ``inputs``: files it reads beside ``files`` and the checkpoint (a config, @lists),
    which no output may replace. ``output`` "-": the CSV goes to standard output, the line to
    standard error, and no summary file is written."""
    cfg, ckpt = run.cfg, run.checkpoints["end"]
    to_stdout = output == STDOUT
    with distributed_context(cfg.device) as ctx, exact_fp32(ctx.device), _stdout_staging(to_stdout, ctx) as staged:
        target = staged or output
        summary_path = os.path.splitext(target)[0] + ".json"
        if not to_stdout:
            stop_unless_main_agrees(lambda: prediction_outputs_problem(output, summary_path,
                                                                       [*files, ckpt.path, *inputs]), ctx)
        with lock_beside(target, f"--output {output!r}") if ctx.is_main else nullcontext():
            scorer = Scorer.from_checkpoints(run, ctx)
            calibration = calibrate(scorer, calibration_set, tpr)
            if ctx.is_main:
                log.info("calibration (%s): %s on %d images of %s", calibration["from"],
                         ", ".join(f"{t} <= {v:.6g}" for t, v in calibration["thresholds"].items()),
                         calibration["images"], calibration["set"])
            counts = predict_files(scorer, files, calibration["thresholds"], score, target)
            if not ctx.is_main:
                return None
            summary = {"checkpoint": ckpt.path, "score": score, "tpr": tpr, "thresholds": calibration["thresholds"],
                       "calibration": {"set": calibration["set"], "images": calibration["images"],
                                       "accepted": calibration["accepted"]},
                       "settings": {k: v for k, v in meta(scorer).items() if k not in ("checkpoints", "fpr95")},
                       "counts": counts, "csv": output}
            line = (f"{counts['scored']} scored, {counts['flagged']} flagged OOD, {counts['unreadable']} unreadable "
                    f"({score} > {calibration['thresholds'][score]:.6g}: {calibration['accepted'][score]} of "
                    f"{calibration['images']} {calibration['set']} images accepted, --tpr {tpr:g}) -> {output}")
            if to_stdout:
                with open(target, newline="", **NAMES_AS_GIVEN) as f:
                    sys.stdout.write(f.read())
                sys.stdout.flush()
                print(line, file=sys.stderr)
            else:
                atomic_write_text(summary_path, json.dumps(summary, indent=2))
                print(line)
            return summary


@contextmanager
def _stdout_staging(on: bool, ctx):
    """For ``--output -``: the path of a CSV in a hidden folder of this run's own in the working folder
    (the same name on every rank), where the CSV is assembled before it goes to standard output;
    None otherwise. The folder is removed at the end."""
    if not on:
        yield None
        return
    folder = os.path.abspath(f".predict-stdout-{shared_token(ctx)}")
    os.makedirs(folder, exist_ok=True)
    try:
        yield os.path.join(folder, "predictions.csv")
    finally:
        barrier(ctx)
        if ctx.is_main:
            shutil.rmtree(folder, ignore_errors=True)
