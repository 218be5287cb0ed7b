"""engine/evaluation.py through test_mse_mfsim.py and test_LR.py: outputs against metrics recomputed
from the saved scores, missing sets, groups and baselines, bad inputs."""
import csv
import json
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from datasets import build_dataset, random_subset
from engine.scorer import image_noise
from errors import UserError
from experiment.config import load_config
from models.features import MultiLayerFeatures, standardize
from models.lfdn import LFDN
from scoring.metrics import ood_metrics
from store.checkpoint import (
    load_checkpoint,
)
from tests.helpers import (
    CPU,
    EVAL_DIGITS,
    brute_knn,
    error_line,
    evaluate,
    run_forked,
    run_inprocess,
    scorer_for,
    try_evaluate,
    write_release_checkpoint,
)
from utils.distributed import DistContext


def table_rows(markdown: str, block: str) -> dict:
    """{OOD name: [AUROC, FPR95, AUPR-In, AUPR-Out]} of one block of results.md."""
    section = markdown.split(f"## {block}")[1].split("\n## ")[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| (\S+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", line)
        if m:
            rows[m.group(1)] = [float(x) for x in m.groups()[2:]]
    return rows


def test_baselines_and_groups_in_an_evaluation(trained, tmp_path):
    out = tmp_path / "b"
    run_inprocess("test_mse_mfsim.py", "--pretrained_ldm_ckpt", str(trained.ckpt / "checkpoint-last.pth"),
                  "--pretrained_ldm_cfg", trained.config, "--output_dir", str(out), "--no_plots",
                  "--baselines", "knn,mahalanobis", "--knn_k", "1,7", "--ood", "three=digits@3",
                  "--ood", "gauss=noise:gaussian:200", "--group", "three=near", "--group", "gauss=far")
    md = (out / "results.md").read_text()
    assert "## kNN_k7  (baseline on the same features, not DLSR)" in md and "## Mahalanobis  (baseline" in md
    assert "| **near mean** |" in md and "| **far mean** |" in md
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["baselines"] == ["kNN_k1", "kNN_k7", "Mahalanobis"]
    for field in ("MFsim", "kNN_k7"):
        assert data["metrics"][field]["near mean"] == data["metrics"][field]["three"]
        assert data["metrics"][field]["far mean"] == data["metrics"][field]["gauss"]
    scores = np.load(out / "scores" / "three.npy")
    assert set(scores.dtype.names) == {"MFsim", "MSE", "kNN_k1", "kNN_k7", "Mahalanobis"}
    # The ID training features (digits, subset 256 in this config) come from the cache training wrote.
    from experiment.config import load_config
    cfg = load_config(trained.config)
    scorer = scorer_for(cfg, DistContext(0, 1, 0, torch.device("cpu")),
                                     {"end": str(trained.ckpt / "checkpoint-last.pth")})
    train = scorer.set_features(random_subset(build_dataset("digits", "train", cfg.data_path, 32), 256), split="train")
    assert train.from_cache
    z = scorer.set_features(build_dataset("digits@3", "test", cfg.data_path, 32)).z
    assert np.allclose(scores["kNN_k7"], brute_knn(train.z.double().numpy(), z.double().numpy(), 7), atol=1e-5)


def test_mse_mfsim_outputs_match_metrics_recomputed_from_saved_scores(trained):
    out = trained.tmp / "res"
    proc = evaluate(trained, out, "--similarity_type", "MFsim", "--save_features", forked=True)
    for f in ("results.md", "results.json", "results.csv", "scores/ID.npy", "scores/gauss.npy", "scores/photos.npy",
              "features/ID.npy", "roc_MFsim.png", "hist_MFsim.png"):
        assert (out / f).is_file(), f
    md = (out / "results.md").read_text()
    assert "## MFsim  (headline)" in md and md in proc.stdout  # the table is also printed
    ids = np.load(out / "scores" / "ID.npy")
    assert ids.dtype.names == ("MFsim", "MSE") and len(ids) == EVAL_DIGITS  # every image, no dropped batch
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
    assert feats.shape == (EVAL_DIGITS, 512) and abs(feats[:, :16].mean()) < 1e-4
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


def test_an_ood_set_identical_to_the_id_set_is_at_chance(trained):
    out = trained.tmp / "same"
    evaluate(trained, out, "--ood", f"same={trained.cfg['eval']['dataset']}")
    auroc = json.loads((out / "results.json").read_text())["metrics"]["MFsim"]["same"]["AUROC"]
    assert auroc == pytest.approx(0.5)  # the same images draw the same noise: the same scores, all tied


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
    line = fails("--pretrained_ldm_ckpt", good, *cfg, "--ood", "ID=photos:20")
    assert line == "error: an OOD set may not be called 'ID': that name is the ID test set's"
    line = fails("--pretrained_ldm_ckpt", good, *cfg, "--baselines", "knn", "--knn_k", "1,300")
    assert line.startswith("error: baselines: kNN with k = 300 needs at least that many training features") \
        and "256" in line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == kept
    assert all(p.stat().st_mtime_ns == m for p, m in cache.items())


def test_skip_missing_marks_sets_in_the_table(trained):
    out = trained.tmp / "skip"
    evaluate(trained, out, "--ood", "gauss=noise:gaussian:200", "--ood", "LSUN=folder:LSUN", "--skip_missing")
    md = (out / "results.md").read_text()
    assert "| LSUN | missing |" in md
    assert "| **mean** | incomplete (LSUN missing) | - | - | - | - |" in md  # no mean over fewer sets
    data = json.loads((out / "results.json").read_text())
    assert data["metrics"]["MFsim"]["LSUN"] is None and data["metrics"]["MFsim"]["mean"] is None
    assert data["sets"]["LSUN"] == {"spec": "folder:LSUN", "images": 0, "features": "missing", "seconds": 0.0,
                                    "images_per_s": None}  # named, with the set it stands for
    assert data["sets"]["gauss"]["spec"] == "noise:gaussian:200" and data["sets"]["gauss"]["images"] == 200
    rows = {(r["score"], r["ood_set"]): r for r in csv.DictReader(open(out / "results.csv"))}
    assert rows[("MFsim", "LSUN")]["AUROC"] == "missing" and rows[("MFsim", "mean")]["AUROC"] == "incomplete"
    assert float(rows[("MFsim", "gauss")]["AUROC"]) > 90
    assert not os.path.exists(out / "scores" / "LSUN.npy")


def test_ood_names_that_collide_are_refused(trained, tmp_path):
    line = error_line(try_evaluate(trained, tmp_path / "o", "--ood", "x y=digits", "--ood", "x_y=photos:100"))
    assert "'x y' and 'x_y'" in line and "scores/x_y.npy" in line
    assert "twice" in error_line(try_evaluate(trained, tmp_path / "o", "--ood", "a=digits", "--ood", "a=photos:100"))


def test_two_of_our_own_runs_contend_for_an_evaluation_folder(trained, tmp_path):
    from store.report import output_lock
    out = tmp_path / "res"
    with output_lock(str(out)):  # this process holds our lock; another process asks for it
        proc = run_forked("test_mse_mfsim.py", "--pretrained_ldm_ckpt", str(trained.ckpt / "checkpoint-last.pth"),
                          "--pretrained_ldm_cfg", trained.config, "--output_dir", str(out), check=False)
    assert proc.returncode == 2 and "is in use by another run" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("flag,value,key,typed", [
    ("--subset_timesteps_num", "1", "diffusion.subset_timesteps_num", 1),
    ("--subset_timesteps_num", "10", "diffusion.subset_timesteps_num", 10),
    ("--eta", "0", "diffusion.eta", 0.0),
    ("--indexing", "consistent", "diffusion.indexing", "consistent"),
    ("--mfsim_layers", "all", "eval.mfsim_layers", "all"),
    ("--seed", "3", "eval.seed", 3),
])
def test_each_score_flag_gives_what_the_engine_gives_with_that_setting(trained, baseline, tmp_path, flag, value, key,
                                                                       typed):
    out = tmp_path / "flag"
    run_inprocess("test_mse_mfsim.py", "--pretrained_ldm_ckpt", str(trained.ckpt / "checkpoint-last.pth"),
                  "--pretrained_ldm_cfg", trained.config, "--output_dir", str(out), "--no_plots", flag, value)
    got = np.load(out / "scores" / "gauss.npy")
    default = np.load(baseline / "scores" / "gauss.npy")
    cfg = load_config(trained.config)
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, typed)  # the setting applied directly, not through the flag
    scorer = scorer_for(cfg, CPU, {"end": str(trained.ckpt / "checkpoint-last.pth")})
    feats = scorer.set_features(build_dataset("noise:gaussian:200", "test", cfg.data_path, 32))
    expected = scorer.scores(feats.z, feats.keys)
    changed = "MFsim" if key != "eval.mfsim_layers" else "MFsim"
    assert np.array_equal(got[changed], expected[changed])
    assert not np.allclose(got[changed], default[changed], rtol=1e-4)
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta[name if name != "subset_timesteps_num" else "subset_timesteps_num"] == typed


def test_mfsim_layers_all_averages_every_layer_by_hand(trained, tmp_path):
    cfg = load_config(trained.config)
    cfg.eval.mfsim_layers = "all"
    scorer = scorer_for(cfg, CPU, {"end": str(trained.ckpt / "checkpoint-last.pth")})
    z = standardize(torch.randn(6, 512), scorer.extractor.indices)
    keys = torch.arange(6)
    d = cfg.diffusion
    rec = scorer.diffusion.reconstruct(scorer.models["end"], z, d.subset_timesteps_num, d.eta, indexing=d.indexing,
                                       noise=image_noise(keys, cfg.eval.seed, "end",
                                                         scorer.diffusion.noise_draws(3, 1.0, "release"), (512,)))
    bounds = [0, 16, 40, 80, 192, 512]
    cos = torch.stack([F.cosine_similarity(rec[:, lo:hi], z[:, lo:hi], dim=1) for lo, hi in zip(bounds, bounds[1:])], 1)
    got = scorer.scores(z, keys)
    assert np.allclose(got["MFsim"], -cos.mean(1).double().numpy(), atol=1e-6)
    assert np.allclose(got["MSE"], ((rec - z) ** 2).sum(1).double().numpy(), rtol=1e-5)


def test_fpr95_convention_flag_changes_the_saved_metric_to_that_convention(trained, baseline, tmp_path):
    out = tmp_path / "fpr"
    run_inprocess("test_mse_mfsim.py", "--pretrained_ldm_ckpt", str(trained.ckpt / "checkpoint-last.pth"),
                  "--pretrained_ldm_cfg", trained.config, "--output_dir", str(out), "--no_plots",
                  "--fpr95", "ood_positive", "--ood", "same=digits", "--ood", "gauss=noise:gaussian:200")
    ids, same = np.load(out / "scores" / "ID.npy")["MSE"], np.load(out / "scores" / "same.npy")["MSE"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["meta"]["fpr95"] == "ood_positive"
    fpr = saved["metrics"]["MSE"]["same"]["FPR95"]
    assert fpr == pytest.approx(ood_metrics(ids, same, "ood_positive")["FPR95"])
    # The release convention on the same scores: OOD accepted while 95% of ID is kept.
    assert ood_metrics(ids, same, "release")["FPR95"] == pytest.approx(np.mean(same < np.percentile(ids, 95)))
    assert abs(fpr - ood_metrics(ids, same, "release")["FPR95"]) > 0.01
    default = json.loads((baseline / "results.json").read_text())
    assert default["meta"]["fpr95"] == "release"


def test_the_variant_flags_reach_the_evaluation_and_its_report(trained, tmp_path):
    run_inprocess("test_mse_mfsim.py", "--pretrained_ldm_ckpt", str(trained.ckpt / "checkpoint-last.pth"),
                  "--pretrained_ldm_cfg", trained.config, "--noise_draws", "2", "--layer_norm", "--no_plots",
                  "--output_dir", str(tmp_path / "v"))
    md = (tmp_path / "v" / "results.md").read_text()
    assert "Score variant (not the release's): 2 noise draws averaged, layer-normalised errors" in md
    import json
    meta = json.loads((tmp_path / "v" / "results.json").read_text())["meta"]
    assert (meta["noise_draws"], meta["layer_norm"]) == (2, True)
    id_scores = np.load(tmp_path / "v" / "scores" / "ID.npy")["MFsim"]
    assert abs(id_scores.mean()) < 0.5  # standardised against the ID training vectors: centred near 0


def test_ranks_agree_on_the_sets_a_node_lacks(monkeypatch, tmp_path):
    """Each node's own data folder: a set missing on one node only is missing for every rank (with
    --skip_missing; without, every rank stops), named with the node, so the ranks' collectives match."""
    import engine.evaluation as evaluation
    from experiment.config import Config
    cfg = Config(data_path=str(tmp_path))
    cfg.eval.dataset, cfg.eval.ood, cfg.eval.groups = "digits", {"here": "noise:gaussian:5", "there": "folder:x"}, {}
    ctx = DistContext(0, 2, 0, torch.device("cpu"), launched=True)
    # This is rank 0, which has "here" and lacks "there"; rank 1 (another node) lacks both.
    def lacking(flag, ctx):  # the all-reduce over ranks, per set in the config's order
        return next(order)
    monkeypatch.setattr(evaluation, "ranks_holding", lacking)
    monkeypatch.setattr(evaluation, "build_datasets", lambda specs, *a: (
        {n: object() for n in specs if n != "there"}, {"there": "no folder at x"}))
    order = iter([[], [1], [0, 1]])  # ID, here, there
    id_set, found, missing = evaluation.find_sets(cfg, skip_missing=True, ctx=ctx)
    assert set(missing) == {"here", "there"} and not found and id_set is not None
    assert "missing on rank(s) 1" in missing["here"] and missing["there"] == "no folder at x"
    order = iter([[], [1], [0, 1]])
    with pytest.raises(UserError, match=r"2 set\(s\) missing.*here .*missing on rank\(s\) 1"):
        evaluation.find_sets(cfg, skip_missing=False, ctx=ctx)
