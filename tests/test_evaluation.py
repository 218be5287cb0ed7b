"""The evaluation scripts end to end on a tiny trained run: tables recomputed from the saved scores, LR
as first minus end, seeds, an OOD set equal to the ID set at chance, release-layout checkpoints
scoring like ours, bad inputs in one line, missing sets."""
import csv
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from models.features import MultiLayerFeatures
from models.lfdn import LFDN
from tests.helpers import run_inprocess, run_script, write_release_checkpoint
from utils.checkpoint import load_checkpoint
from utils.metrics import ood_metrics


def evaluate(t, out, *extra, script="test_mse_mfsim.py", check=True, torchrun=0, subprocess=False, threads=0):
    """Run an evaluation script; in this process unless ``subprocess`` or ``torchrun`` (then as a user would)."""
    if script == "test_mse_mfsim.py":
        ckpt = ["--pretrained_ldm_ckpt", str(t.ckpt / "checkpoint-last.pth")]
    else:
        ckpt = ["--pretrained_ldm_ckpt_first", str(t.ckpt / "checkpoint-0.pth"),
                "--pretrained_ldm_ckpt_end", str(t.ckpt / "checkpoint-last.pth")]
    args = [*ckpt, "--pretrained_ldm_cfg", t.config, "--evaluate", "--output_dir", str(out), *extra]
    if subprocess or torchrun:
        return run_script(script, *args, check=check, torchrun=torchrun, threads=threads)
    return run_inprocess(script, *args, "--no_plots", check=check)


def table_rows(markdown: str, block: str) -> dict:
    """{OOD name: [AUROC, FPR95, AUPR-In, AUPR-Out]} of one block of results.md."""
    section = markdown.split(f"## {block}")[1].split("\n## ")[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| (\S+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", line)
        if m:
            rows[m.group(1)] = [float(x) for x in m.groups()[2:]]
    return rows


def test_mse_mfsim_outputs_match_metrics_recomputed_from_saved_scores(trained):
    out = trained.tmp / "res"
    proc = evaluate(trained, out, "--similarity_type", "MFsim", "--save_features", subprocess=True)
    for f in ("results.md", "results.json", "results.csv", "scores/ID.npy", "scores/gauss.npy", "scores/photos.npy",
              "features/ID.npy", "roc_MFsim.png", "hist_MFsim.png"):
        assert (out / f).is_file(), f
    md = (out / "results.md").read_text()
    assert "## MFsim  (headline)" in md and md in proc.stdout  # the table is also printed
    ids = np.load(out / "scores" / "ID.npy")
    assert ids.dtype.names == ("MFsim", "MSE") and len(ids) == 1797  # every image, no dropped batch
    data = json.loads((out / "results.json").read_text())
    for block in ("MFsim", "MSE"):
        rows = table_rows(md, block)
        assert set(rows) == {"gauss", "photos"}
        for name, shown in rows.items():
            m = ood_metrics(ids[block], np.load(out / "scores" / f"{name}.npy")[block])
            assert shown == [round(100 * m[k], 2) for k in ("AUROC", "FPR95", "AUPR_In", "AUPR_Out")]
            assert data["metrics"][block][name] == pytest.approx(m)
        mean = np.mean([data["metrics"][block][n]["AUROC"] for n in rows])
        assert data["metrics"][block]["mean"]["AUROC"] == pytest.approx(mean)
    with open(out / "results.csv") as f:
        csv_rows = {(r["score"], r["ood_set"]): r for r in csv.DictReader(f)}
    assert float(csv_rows[("MSE", "gauss")]["AUROC"]) == pytest.approx(100 * data["metrics"]["MSE"]["gauss"]["AUROC"])
    feats = np.load(out / "features" / "ID.npy")
    assert feats.shape == (1797, 512) and abs(feats[:, :16].mean()) < 1e-4
    assert data["sets"]["ID"]["images_per_s"] > 0 and data["meta"]["subset_timesteps_num"] == 3


def test_lr_is_first_minus_end_and_end_equals_the_single_checkpoint_scores(trained):
    single, lr = trained.tmp / "single", trained.tmp / "lr"
    evaluate(trained, single)
    evaluate(trained, lr, "--similarity_type", "MFsim", script="test_LR.py")
    md = (lr / "results.md").read_text()
    assert md.index("## LR_MFsim  (headline)") < md.index("## first_MFsim") < md.index("## end_MFsim")
    for name in ("ID", "gauss"):
        s = np.load(lr / "scores" / f"{name}.npy")
        assert np.array_equal(s["LR_MFsim"], s["first_MFsim"] - s["end_MFsim"])
        assert np.array_equal(s["LR_MSE"], s["first_MSE"] - s["end_MSE"])
        assert np.array_equal(s["end_MFsim"], np.load(single / "scores" / f"{name}.npy")["MFsim"])
        assert not np.array_equal(s["first_MFsim"], s["end_MFsim"])


def test_same_seed_same_scores_other_seed_other_scores(trained):
    evaluate(trained, trained.tmp / "s0a")
    evaluate(trained, trained.tmp / "s0b")
    evaluate(trained, trained.tmp / "s1", "--seed", "1")
    a, b, c = (np.load(trained.tmp / d / "scores" / "ID.npy") for d in ("s0a", "s0b", "s1"))
    assert np.array_equal(a, b)
    assert not np.array_equal(a["MFsim"], c["MFsim"])


def test_an_ood_set_identical_to_the_id_set_is_at_chance(trained):
    out = trained.tmp / "same"
    evaluate(trained, out, "--ood", "same=digits")
    auroc = json.loads((out / "results.json").read_text())["metrics"]["MFsim"]["same"]["AUROC"]
    assert 0.45 < auroc < 0.55


def test_release_layout_checkpoint_scores_like_ours(trained):
    ours = load_checkpoint(str(trained.ckpt / "checkpoint-last.pth"))
    backbone = MultiLayerFeatures("efficientnet-lite0").backbone.state_dict()
    release = trained.tmp / "release" / "checkpoint-last.pth"
    release.parent.mkdir()
    write_release_checkpoint(release, ours.model, ours.ema["weights"], backbone, feature_dim=512)
    out = trained.tmp / "release-res"
    run_inprocess("test_mse_mfsim.py", "--pretrained_ldm_ckpt", str(release), "--pretrained_ldm_cfg", trained.config,
                  "--evaluate", "--output_dir", str(out), "--no_plots")
    evaluate(trained, trained.tmp / "ours-res")
    for name in ("ID", "gauss", "photos"):
        assert np.array_equal(np.load(out / "scores" / f"{name}.npy"),
                              np.load(trained.tmp / "ours-res" / "scores" / f"{name}.npy"))
    assert "release, epoch 149" in (out / "results.md").read_text()


def error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return proc.stderr.strip().splitlines()[-1]


def test_bad_inputs_give_one_line_and_lose_nothing(trained):
    t, out = trained, trained.tmp / "kept"
    evaluate(t, out)
    kept = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    cache = {p: p.stat().st_mtime_ns for p in (t.tmp / "cache").iterdir()}

    def fails(*args, script="test_mse_mfsim.py"):
        return error_line(run_inprocess(script, *args, "--output_dir", str(out), check=False))

    cfg = ["--pretrained_ldm_cfg", t.config]
    good = str(t.ckpt / "checkpoint-last.pth")
    assert "does not exist" in fails("--pretrained_ldm_ckpt", str(t.tmp / "none.pth"), *cfg)
    corrupt = t.tmp / "corrupt.pth"
    corrupt.write_bytes((t.ckpt / "checkpoint-last.pth").read_bytes()[:5000])
    assert "not a readable checkpoint" in fails("--pretrained_ldm_ckpt", str(corrupt), *cfg)
    wide = t.tmp / "wide.pth"
    sd = LFDN(in_channels=720, time_embed_dim=8, model_channels=16, bottleneck_channels=16, out_channels=720,
              num_res_blocks=1).state_dict()
    write_release_checkpoint(wide, sd, sd)
    line = fails("--pretrained_ldm_ckpt", str(wide), *cfg)
    assert "720-d features" in line and "512-d" in line
    assert "unknown dataset 'imagenet'" in fails("--pretrained_ldm_ckpt", good, *cfg, "--ood", "X=imagenet")
    line = fails("--pretrained_ldm_ckpt", good, *cfg, "--ood", "A=folder:nowhere", "--ood", "B=svhn")
    assert "2 set(s) missing" in line and "nowhere" in line and "test_32x32.mat" in line
    line = fails("--pretrained_ldm_ckpt", good, *cfg, "--dataset", "cifar10", "--ood", "A=folder:nowhere",
                 "--skip_missing")
    assert "ID test set (cifar10)" in line and "cifar-10-batches-py" in line and "nowhere" in line
    (t.tmp / "data" / "empty").mkdir(parents=True, exist_ok=True)
    assert "no images" in fails("--pretrained_ldm_ckpt", good, *cfg, "--ood", "E=folder:empty")
    bad = t.tmp / "data" / "bad"
    bad.mkdir(exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(bad / "ok.png")
    (bad / "broken.png").write_bytes(b"garbage")
    line = fails("--pretrained_ldm_ckpt", good, *cfg, "--ood", "B=folder:bad")
    assert line.startswith("error: cannot read image") and str(bad / "broken.png") in line
    line = fails("--pretrained_ldm_ckpt", good, *cfg, "--ood", "B=folder:bad", "--num_workers", "1")
    assert line.startswith("error: cannot read image") and str(bad / "broken.png") in line
    assert "does not exist" in fails("--pretrained_ldm_ckpt_first", str(t.tmp / "none.pth"),
                                     "--pretrained_ldm_ckpt_end", good, *cfg, script="test_LR.py")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == kept
    assert all(p.stat().st_mtime_ns == m for p, m in cache.items())


def test_skip_missing_marks_sets_in_the_table(trained):
    out = trained.tmp / "skip"
    evaluate(trained, out, "--ood", "gauss=noise:gaussian:200", "--ood", "LSUN=folder:LSUN", "--skip_missing")
    md = (out / "results.md").read_text()
    assert "| LSUN | missing |" in md
    data = json.loads((out / "results.json").read_text())
    assert data["metrics"]["MFsim"]["LSUN"] is None
    assert data["metrics"]["MFsim"]["mean"]["AUROC"] == data["metrics"]["MFsim"]["gauss"]["AUROC"]
    assert not os.path.exists(out / "scores" / "LSUN.npy")
