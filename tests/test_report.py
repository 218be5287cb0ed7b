"""store/report.py: the results tables (means, groups, missing sets) and folders replaced whole."""
import csv
import errno
import logging
import os

import numpy as np
import pytest

from errors import UserError
from store.report import summary_rows
from store.rundir import check_writable, replace_folder
from tests.helpers import error_line, run_inprocess, snapshot, try_evaluate


def test_group_means_by_hand():
    rows = {"a": {"AUROC": 0.6, "FPR95": 0.9, "AUPR_In": 0.5, "AUPR_Out": 0.4},
            "b": {"AUROC": 1.0, "FPR95": 0.0, "AUPR_In": 1.0, "AUPR_Out": 1.0},
            "c": {"AUROC": 0.8, "FPR95": 0.2, "AUPR_In": 0.7, "AUPR_Out": 0.6},
            "d": None}
    got = dict(summary_rows(rows, {"a": "near", "b": "far", "c": "far", "d": "other"}))
    assert list(got) == ["near mean", "far mean", "mean"]
    assert got["near mean"]["AUROC"] == pytest.approx(0.6)
    assert got["far mean"]["AUROC"] == pytest.approx(0.9) and got["far mean"]["FPR95"] == pytest.approx(0.1)
    assert got["mean"] is None  # d is missing: no mean over the other three is shown as the benchmark's
    complete = {k: v for k, v in rows.items() if v is not None}
    assert dict(summary_rows(complete, {}))["mean"]["AUROC"] == pytest.approx(0.8)
    assert list(dict(summary_rows(rows, {}))) == ["mean"]
    got = dict(summary_rows(rows, {"a": "near", "b": "far", "c": "far", "d": "far"}))
    assert got["near mean"]["AUROC"] == pytest.approx(0.6) and got["far mean"] is None  # far lacks d


def test_a_failed_write_leaves_the_previous_results_whole(trained, tmp_path, monkeypatch):
    out = tmp_path / "res"
    try_evaluate(trained, out, check=True)
    before = snapshot(out)
    saves = []
    original = np.save

    def disk_fills_up(*args, **kwargs):
        saves.append(1)
        if len(saves) > 1:  # the second score file hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(np, "save", disk_fills_up)
    line = error_line(try_evaluate(trained, out, "--seed", "1"))
    assert "no space left on device" in line and str(out) in line
    assert snapshot(out) == before  # seed 0's results, all of them, and nothing of seed 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".res.lock", "res"]  # no staging folder left


def test_output_problems_are_reported_before_any_work(trained, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    line = error_line(try_evaluate(trained, tmp_path / "file"))
    assert line == f"error: output folder {str(tmp_path / 'file')!r} is a file, not a folder"
    line = error_line(try_evaluate(trained, tmp_path / "file" / "res"))  # its folder is a file
    assert line == f"error: the folder of the output folder {str(tmp_path / 'file')!r} is a file, not a folder"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me")
    assert "not evaluation results (thesis.tex)" in error_line(try_evaluate(trained, tmp_path / "mine"))
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "keep me"
    cache = tmp_path / "cache-file"
    cache.write_text("x")
    line = error_line(try_evaluate(trained, tmp_path / "o", "--cache_dir", str(cache)))
    assert line == f"error: feature cache folder {str(cache)!r} is a file, not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache-file", "file", "mine"]  # nothing made

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match=r"cannot write to output folder '.*': no space left on device"):
        check_writable(str(tmp_path / "x"), "output folder")
    cfg = trained.write("full.yaml", output_dir=str(tmp_path / "full"))
    assert "no space left on device" in error_line(run_inprocess("main.py", "--config", cfg, check=False))


def test_a_failure_while_swapping_results_in_leaves_the_old_results(tmp_path, monkeypatch):
    old, new = tmp_path / "results", tmp_path / "staging"
    old.mkdir()
    (old / "results.md").write_text("old")
    new.mkdir()
    (new / "results.md").write_text("new")
    real = os.rename

    def failing(src, dst):
        if str(src) == str(new):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError):
        replace_folder(str(new), str(old))
    monkeypatch.setattr(os, "rename", real)
    assert (old / "results.md").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results", "staging"]
    replace_folder(str(new), str(old))
    assert (old / "results.md").read_text() == "new" and not new.exists()


def test_results_csv_gives_each_sets_image_count_and_says_missing_and_incomplete():
    from store.report import EvalResult, SetResult, results_csv
    sets = {"ID": SetResult("ID", "digits", 50, features_from="cache"),
            "a": SetResult("a", "noise", 30, features_from="extracted"), "b": SetResult("b", "svhn", 7),
            "c": SetResult("c", "photos", 20, features_from="cache")}
    m = {"AUROC": 0.75, "AUPR_In": 0.5, "AUPR_Out": 0.25, "FPR95": 0.125}
    metrics = {"MFsim": {"a": m, "b": None, "c": {k: v / 2 for k, v in m.items()}}}
    text = results_csv(EvalResult("MFsim", ["MFsim"], sets, metrics, {"groups": {"a": "near", "b": "far", "c": "far"}}))
    head, *rows = list(csv.reader(text.splitlines()))
    assert head[:3] == ["score", "ood_set", "images"]
    width = len(head) - 3
    assert rows[0] == ["MFsim", "a", "30", *[f"{100 * m[k]:.6f}" for k in head[3:]]]
    assert rows[1] == ["MFsim", "b", "", *["missing"] * width]  # never read: no image count either
    assert rows[2] == ["MFsim", "c", "20", *[f"{50 * m[k]:.6f}" for k in head[3:]]]
    assert rows[3] == ["MFsim", "near mean", "", *[f"{100 * m[k]:.6f}" for k in head[3:]]]
    assert rows[4] == ["MFsim", "far mean", "", *["incomplete"] * width]  # b is missing: no mean of c alone
    assert rows[5] == ["MFsim", "mean", "", *["incomplete"] * width] and len(rows) == 6


def test_near_and_far_rows_of_results_csv(trained, tmp_path):
    out = tmp_path / "res"
    run_inprocess("test_mse_mfsim.py", "--pretrained_ldm_ckpt", str(trained.ckpt / "checkpoint-last.pth"),
                  "--pretrained_ldm_cfg", trained.config, "--ood", "gauss=noise:gaussian:200",
                  "--ood", "photos=photos:200", "--ood", "digits2=digits@0-4", "--group", "digits2=near",
                  "--group", "gauss=far", "--group", "photos=far", "--no_plots", "--output_dir", str(out))
    rows = {(r["score"], r["ood_set"]): r for r in csv.DictReader(open(out / "results.csv"))}
    for score in ("MFsim", "MSE"):
        per = {n: float(rows[(score, n)]["AUROC"]) for n in ("gauss", "photos", "digits2")}
        assert float(rows[(score, "near mean")]["AUROC"]) == pytest.approx(per["digits2"])
        assert float(rows[(score, "far mean")]["AUROC"]) == pytest.approx((per["gauss"] + per["photos"]) / 2)
        assert float(rows[(score, "mean")]["AUROC"]) == pytest.approx(sum(per.values()) / 3)


def test_plots_have_one_panel_per_ood_set_that_was_scored_three_to_a_row(tmp_path, monkeypatch, caplog):
    from PIL import Image

    from store.report import EvalResult, SetResult, write_plots
    rng = np.random.default_rng(0)

    def result(present: int, missing: int) -> EvalResult:
        sets = {"ID": SetResult("ID", "digits", 50, {"MFsim": rng.normal(size=50)}, features_from="cache")}
        for i in range(present):
            sets[f"o{i}"] = SetResult(f"o{i}", "noise", 30, {"MFsim": rng.normal(1, size=30)}, features_from="extracted")
        for i in range(missing):
            sets[f"m{i}"] = SetResult(f"m{i}", "svhn")
        metrics = {"MFsim": {**{f"o{i}": {"AUROC": 0.75} for i in range(present)},
                             **{f"m{i}": None for i in range(missing)}}}
        return EvalResult("MFsim", ["MFsim"], sets, metrics, {"id_dataset": "digits"})

    for present, missing, (cols, rows) in ((1, 1, (1, 1)), (3, 0, (3, 1)), (4, 2, (3, 2))):
        out = tmp_path / f"{present}-{missing}"
        out.mkdir()
        paths = write_plots(result(present, missing), str(out))
        assert paths == [str(out / "roc_MFsim.png"), str(out / "hist_MFsim.png")]
        assert Image.open(out / "hist_MFsim.png").size == (4 * 120 * cols, 3 * 120 * rows)  # 4 x 3 inches a panel
    empty = tmp_path / "none"
    empty.mkdir()
    assert write_plots(result(0, 2), str(empty)) == [] and not list(empty.iterdir())  # every OOD set missing
    import matplotlib.figure
    from sklearn.metrics import roc_curve
    drawn, save = [], matplotlib.figure.Figure.savefig

    def record(fig, *a, **k):  # what each saved figure shows: titles, legends, the curves' points
        drawn.append([(ax.get_title(), [t.get_text() for t in ax.get_legend().get_texts()], [l.get_xydata() for l in ax.lines])
                      for ax in fig.axes if ax.axison])
        return save(fig, *a, **k)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    two = result(2, 1)
    two.metrics["MFsim"]["o1"] = {"AUROC": 0.5}
    (tmp_path / "two").mkdir()
    write_plots(two, str(tmp_path / "two"))
    (roc_title, roc_legend, curves), = drawn[0]
    assert roc_title == "ROC, MFsim" and roc_legend == ["o0 (AUROC 75.00)", "o1 (AUROC 50.00)"]
    for name, curve in zip(("o0", "o1"), curves):
        id_s, ood = two.sets["ID"].scores["MFsim"], two.sets[name].scores["MFsim"]
        fpr, tpr, _ = roc_curve(np.r_[np.zeros(50), np.ones(30)], np.r_[id_s, ood])  # OOD positive
        assert np.array_equal(curve, np.c_[fpr, tpr])
    assert [(title, legend) for title, legend, _ in drawn[1]] == [("MFsim: ID vs o0", ["ID (digits)", "o0"]),
                                                                  ("MFsim: ID vs o1", ["ID (digits)", "o1"])]
    import sys
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed: import raises ImportError
    with caplog.at_level(logging.INFO, logger="dlsr"):
        assert write_plots(result(2, 0), str(empty)) == [] and not list(empty.iterdir())
    assert [r.message for r in caplog.records] == ["matplotlib is not installed: no plots"]


def test_results_md_says_what_was_scored_with_what_settings_line_by_line():
    """format_markdown by hand: every value of the header in its place (each one distinct, so that a
    value shown under another's name shows), the tables, the group means and the throughput."""
    from store.report import EvalResult, SetResult, format_markdown
    meta = {"checkpoints": {"first": {"path": "r/checkpoint-0.pth", "kind": "dlsr", "epoch": 0},
                            "end": {"path": "r/checkpoint-last.pth", "kind": "release", "epoch": 149}},
            "id_dataset": "cifar10", "backbone": "efficientnet-b4@abc", "input_size": 224, "subset_timesteps_num": 3,
            "eta": 0.5, "indexing": "consistent", "mfsim_layers": "all", "fpr95": "ood_positive", "seed": 7,
            "device": "cuda", "processes": 2, "precision": "cuda-fp32", "noise_draws": 4, "layer_norm": True,
            "groups": {"near1": "near", "far1": "far", "far2": "far"}, "baselines": ["kNN_k1"]}
    sets = {"ID": SetResult("ID", "cifar10", 1000, features_from="cache", seconds=0.0),
            "near1": SetResult("near1", "cifar100", 500, features_from="extracted", seconds=2.0),
            "far1": SetResult("far1", "svhn", 300, features_from="extracted", seconds=4.0),
            "far2": SetResult("far2", "folder:x", 0)}
    m = {"AUROC": 0.9, "FPR95": 0.25, "AUPR_In": 0.875, "AUPR_Out": 0.5}
    m2 = {"AUROC": 0.7, "FPR95": 0.75, "AUPR_In": 0.625, "AUPR_Out": 0.125}
    metrics = {"LR_MFsim": {"near1": m, "far1": m2, "far2": None}, "kNN_k1": {"near1": m2, "far1": m, "far2": None}}
    md = format_markdown(EvalResult("LR_MFsim", ["LR_MFsim", "kNN_k1"], sets, metrics, meta))
    assert md.splitlines()[:7] == [
        "# DLSR out-of-distribution detection", "",
        "ID test set: cifar10 (1000 images). Checkpoints: first = r/checkpoint-0.pth (dlsr, epoch 0), "
        "end = r/checkpoint-last.pth (release, epoch 149).",
        "Backbone efficientnet-b4@abc at 224 px; k = 3, eta = 0.5, indexing consistent; MFsim layers: all; "
        "FPR95 convention: ood_positive; seed 7; cuda x2, cuda-fp32.",
        "Score variant (not the release's): 4 noise draws averaged, layer-normalised errors over all layers.",
        "All metrics in percent, OOD is the positive class; higher score = more OOD.",
        "Groups: near: near1; far: far1, far2."]
    assert "## LR_MFsim  (headline)\n" in md and "## kNN_k1  (baseline on the same features, not DLSR)\n" in md
    block = md.split("## LR_MFsim  (headline)\n")[1].split("\n## ")[0]
    assert [line for line in block.splitlines() if line.startswith("| ") and "OOD set" not in line] == [
        "| near1 | 500 | 90.00 | 25.00 | 87.50 | 50.00 |",
        "| far1 | 300 | 70.00 | 75.00 | 62.50 | 12.50 |",
        "| far2 | missing | - | - | - | - |",
        "| **near mean** |  | 90.00 | 25.00 | 87.50 | 50.00 |",
        "| **far mean** | incomplete (far2 missing) | - | - | - | - |",
        "| **mean** | incomplete (far2 missing) | - | - | - | - |"]
    assert md.endswith("| ID | 1000 | cache | - |\n| near1 | 500 | extracted | 250.0 |\n"
                       "| far1 | 300 | extracted | 75.0 |\n| far2 | missing | missing | - |\n")
    plain = format_markdown(EvalResult("MFsim", ["MFsim"], sets, {"MFsim": metrics["LR_MFsim"]},
                                       {**meta, "noise_draws": 1, "layer_norm": False, "groups": {}}))
    assert "Score variant" not in plain and "Groups:" not in plain and "**near mean**" not in plain
    for draws, layer_norm, line in ((2, False, "2 noise draws averaged."),
                                    (1, True, "layer-normalised errors over all layers.")):
        one = format_markdown(EvalResult("MFsim", ["MFsim"], sets, {"MFsim": metrics["LR_MFsim"]},
                                         {**meta, "noise_draws": draws, "layer_norm": layer_norm}))
        assert f"Score variant (not the release's): {line}\n" in one  # either variant alone is named


def test_write_outputs_puts_the_folder_in_place_whole_and_returns_the_final_paths(tmp_path):
    from store.report import EvalResult, SetResult, write_outputs
    meta = {"checkpoints": {"end": {"path": "c.pth", "kind": "dlsr", "epoch": 2}}, "id_dataset": "digits",
            "backbone": "lite0@1", "input_size": 32, "subset_timesteps_num": 3, "eta": 1.0, "indexing": "release",
            "mfsim_layers": "release", "fpr95": "release", "seed": 0, "device": "cpu", "processes": 1,
            "precision": "cpu-fp32"}
    sets = {"ID": SetResult("ID", "digits", 3, {"MFsim": np.array([0.1, 0.2, 0.3])}, np.ones((3, 4)), "cache"),
            "g": SetResult("g", "noise", 2, {"MFsim": np.array([0.5, 0.9])}, np.zeros((2, 4)), "extracted", 1.0)}
    result = EvalResult("MFsim", ["MFsim"], sets, {"MFsim": {"g": {"AUROC": 1.0, "FPR95": 0.0, "AUPR_In": 1.0,
                                                                 "AUPR_Out": 1.0}}}, meta)
    out = tmp_path / "res"
    out.mkdir()
    (out / "stale.txt").write_text("a previous run's file")
    paths = write_outputs(result, str(out), save_features=True, plots=False)
    expected = {"scores/ID.npy", "scores/g.npy", "features/ID.npy", "features/g.npy", "results.md", "results.json",
                "results.csv"}
    assert sorted(paths) == sorted(str(out / p) for p in expected)
    assert {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} == expected  # whole: no stale file
    assert np.load(out / "scores" / "g.npy")["MFsim"].tolist() == [0.5, 0.9]
    assert sorted(os.listdir(tmp_path)) == ["res"]  # no staging folder left beside it
