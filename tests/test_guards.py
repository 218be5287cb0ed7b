"""Results that are right, not only produced: each test recomputes a value by another route, or uses
data on which a plausible wrong behaviour gives a different answer (a second chunk, a tie, a
boundary, a field changed alone, a second process holding a lock)."""
import copy
import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from datasets import build_dataset
from errors import UserError
from tests.helpers import run_inprocess, run_script
from utils.checkpoint import check_against, load_checkpoint
from utils.config import load_config
from utils.detector import as_uint8_images
from utils.distributed import DistContext
from utils.evaluation import Scorer, image_noise
from utils.features import EMULATED_BF16_ENV, cache_path, features_for
from utils.metrics import fpr_at_95
from utils.model_factory import build_diffusion, build_extractor
from utils.prediction import calibrate
from utils.rundir import replace_folder
from utils.scores import mfsim_score, mse_score
from utils.training import build_trainer, train

CPU = DistContext(0, 1, 0, torch.device("cpu"))


def digits_uint8():
    return np.round(load_digits().images * (255.0 / 16.0)).astype(np.uint8)


# ---------------------------------------------------------------- LR and its roles

def test_lr_first_scores_use_the_first_checkpoints_own_noise_role(trained):
    ckpts = {"first": str(trained.ckpt / "checkpoint-0.pth"), "end": str(trained.ckpt / "checkpoint-last.pth")}
    cfg = load_config(trained.config)
    scorer = Scorer.from_checkpoints(cfg, CPU, ckpts)
    z, keys = scorer.image_features(as_uint8_images(digits_uint8()[:64], cfg.backbone.input_size))
    got = scorer.scores(z, keys)
    d = cfg.diffusion
    for role in ("first", "end"):  # by hand: the role's weights, the role's noise
        noise = image_noise(keys, cfg.eval.seed, role, scorer.diffusion.noise_draws(d.subset_timesteps_num, d.eta,
                                                                                     d.indexing), z.shape[1:])
        with torch.no_grad():
            rec = scorer.diffusion.reconstruct(scorer.models[role], z, d.subset_timesteps_num, d.eta,
                                               indexing=d.indexing, noise=noise)
        np.testing.assert_allclose(got[f"{role}_MSE"], mse_score(rec, z).double().numpy(), rtol=1e-5)
        np.testing.assert_allclose(got[f"{role}_MFsim"], mfsim_score(rec, z, scorer.extractor.indices).double().numpy(),
                                   rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got["LR_MFsim"], got["first_MFsim"] - got["end_MFsim"])


# ---------------------------------------------------------------- predict.py and its calibration

def test_predict_over_several_chunks_with_a_bad_file_in_the_first_keeps_every_row_with_its_file(trained, tmp_path):
    from utils.detector import DLSRDetector
    folder = tmp_path / "many"
    folder.mkdir()
    digits = digits_uint8()
    for i in range(300):  # chunks of lcm(64, 128) = 128 files: three chunks
        Image.fromarray(digits[i]).save(folder / f"d{i:04d}.png")
    (folder / "d0005.png").write_bytes(b"not an image")
    run_inprocess("predict.py", "--checkpoint", str(trained.ckpt / "checkpoint-last.pth"), "--images", str(folder),
                  "--output", str(tmp_path / "p.csv"))
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert [r["path"] for r in rows] == sorted(str(p) for p in folder.iterdir())
    assert rows[5]["error"].startswith("cannot decode") and rows[5]["MSE"] == ""
    det = DLSRDetector.from_checkpoint(str(trained.ckpt / "checkpoint-last.pth"), device="cpu")
    for i in (0, 6, 127, 128, 200, 299):  # each row's scores are its own image's
        expected = det.predict(digits[i:i + 1], all_scores=True)
        assert float(rows[i]["MSE"]) == pytest.approx(float(expected["MSE"][0]), rel=1e-5), i
        assert float(rows[i]["MFsim"]) == pytest.approx(float(expected["MFsim"][0]), rel=1e-5, abs=1e-7), i


def test_each_calibration_key_field_forces_a_new_record(trained, tmp_path):
    cfg = load_config(trained.config)
    cfg.cache_dir = str(tmp_path / "cache")
    ckpt = str(trained.ckpt / "checkpoint-last.pth")
    scorer = Scorer.from_checkpoints(cfg, CPU, {"end": ckpt})
    assert calibrate(scorer, "digits@0-2", 0.9)["from"] == "computed"
    assert calibrate(scorer, "digits@0-2", 0.9)["from"] == "record"
    changes = {"tpr": lambda c: None, "set": lambda c: None,
               "k": lambda c: setattr(c.diffusion, "subset_timesteps_num", 4),
               "eta": lambda c: setattr(c.diffusion, "eta", 0.5),
               "indexing": lambda c: setattr(c.diffusion, "indexing", "consistent"),
               "seed": lambda c: setattr(c.eval, "seed", 7),
               "mfsim_layers": lambda c: setattr(c.eval, "mfsim_layers", "all"),
               "noise_draws": lambda c: setattr(c.eval, "noise_draws", 2),
               "layer_norm": lambda c: setattr(c.eval, "layer_norm", True)}
    for field, change in changes.items():
        changed = copy.deepcopy(cfg)
        change(changed)
        other = Scorer.from_checkpoints(changed, CPU, {"end": ckpt})
        spec, tpr = ("digits@0-3", 0.9) if field == "set" else ("digits@0-2", 0.8 if field == "tpr" else 0.9)
        assert calibrate(other, spec, tpr)["from"] == "computed", field
    other_weights = Scorer.from_checkpoints(cfg, CPU, {"end": str(trained.ckpt / "checkpoint-0.pth")})
    assert calibrate(other_weights, "digits@0-2", 0.9)["from"] == "computed"


@pytest.mark.parametrize("tpr, ok", [(0.0, False), (1.0, False), (1e-3, True), (0.999, True)])
def test_tpr_bounds_are_exclusive(trained, tmp_path, tpr, ok):
    (tmp_path / "i").mkdir()
    Image.fromarray(digits_uint8()[0]).save(tmp_path / "i" / "a.png")
    proc = run_inprocess("predict.py", "--checkpoint", str(trained.ckpt / "checkpoint-last.pth"), "--images",
                         str(tmp_path / "i"), "--output", str(tmp_path / "p.csv"), "--tpr", str(tpr), check=False)
    assert (proc.returncode == 0) == ok, proc.stderr[-500:]
    if not ok:
        assert "--tpr must be between 0 and 1" in proc.stderr.splitlines()[-1]


# ---------------------------------------------------------------- the API's device

def test_the_configs_device_is_used_even_when_cuda_seems_available(trained, monkeypatch):
    from utils.detector import DLSRDetector
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = load_config(trained.config)
    assert cfg.device == "cpu"
    assert DLSRDetector(cfg).ctx.device == torch.device("cpu")
    cfg.device = "auto"
    assert DLSRDetector(cfg).ctx.device == torch.device("cuda:0")  # auto would take the GPU
    assert DLSRDetector(cfg, device="cpu").ctx.device == torch.device("cpu")


# ---------------------------------------------------------------- training and resume

def test_resume_takes_the_optimiser_settings_given_now(tiny):
    cfg = load_config(tiny.write(train={"epochs": 1, "weight_decay": 0.02}))
    train(cfg, CPU)
    cfg.train.weight_decay, cfg.train.betas, cfg.train.epochs = 0.3, [0.5, 0.6], 2
    trainer = build_trainer(cfg, CPU, resume=str(tiny.ckpt / "checkpoint-last.pth"))
    group = trainer.optimizer.param_groups[0]
    assert (group["weight_decay"], group["betas"]) == (0.3, (0.5, 0.6))
    assert trainer.start_epoch == 1 and len(trainer.optimizer.state) > 0  # the moments came back


def test_a_trailing_partial_accumulation_still_steps_the_optimiser(tiny):
    cfg = load_config(tiny.write(train={"epochs": 2, "accum_iter": 3}))  # 8 steps: 3 + 3 + 2
    trainer = train(cfg, CPU)
    assert trainer.ema.num_updates == 2 * 3


def test_a_resumed_run_keeps_its_id_and_lr_takes_the_pair(tiny):
    cfg = tiny.write(train={"epochs": 2, "save_every": 5})
    run_inprocess("main.py", "--config", cfg)
    first_id = load_checkpoint(str(tiny.ckpt / "checkpoint-0.pth")).run_id
    run_inprocess("main.py", "--config", cfg, "--epochs", "3", "--resume", str(tiny.ckpt / "checkpoint-last.pth"))
    assert load_checkpoint(str(tiny.ckpt / "checkpoint-last.pth")).run_id == first_id
    assert load_checkpoint(str(tiny.ckpt / "checkpoint-last.pth")).epoch == 2
    run_inprocess("test_LR.py", "--pretrained_ldm_ckpt_first", str(tiny.ckpt / "checkpoint-0.pth"),
                  "--pretrained_ldm_ckpt_end", str(tiny.ckpt / "checkpoint-last.pth"), "--pretrained_ldm_cfg", cfg,
                  "--no_plots", "--output_dir", str(tiny.tmp / "lr"))
    assert (tiny.tmp / "lr" / "results.json").is_file()


# ---------------------------------------------------------------- run folders

def test_overwrite_starts_a_new_log(tiny):
    cfg = tiny.write(train={"epochs": 3})
    run_inprocess("main.py", "--config", cfg)
    run_inprocess("main.py", "--config", cfg, "--epochs", "1", "--overwrite")
    assert [json.loads(line)["epoch"] for line in open(tiny.ckpt / "log.txt")] == [0]


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


def test_two_of_our_own_runs_contend_for_an_evaluation_folder(trained, tmp_path):
    from utils.report import output_lock
    out = tmp_path / "res"
    with output_lock(str(out)):  # this process holds our lock; another process asks for it
        proc = run_script("test_mse_mfsim.py", "--pretrained_ldm_ckpt", str(trained.ckpt / "checkpoint-last.pth"),
                          "--pretrained_ldm_cfg", trained.config, "--output_dir", str(out), check=False)
    assert proc.returncode == 2 and "is in use by another run" in proc.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------- config bounds, metrics at ties, reports

def test_config_bounds_at_their_edges(tiny):
    for sections, ok in (({"diffusion": {"subset_timesteps_num": 99}}, True),
                         ({"diffusion": {"subset_timesteps_num": 100}}, False),
                         ({"diffusion": {"subset_timesteps_num": 100, "indexing": "consistent"}}, True),
                         ({"diffusion": {"subset_timesteps_num": 101, "indexing": "consistent"}}, False),
                         ({"diffusion": {"linear_start": 0.01, "linear_end": 0.01}}, False),
                         ({"eval": {"groups": {"nowhere": "near"}}}, False),
                         ({"eval": {"groups": {"gauss": "near"}}}, True)):
        if ok:
            load_config(tiny.write(**sections))
        else:
            with pytest.raises(UserError):
                load_config(tiny.write(**sections))


def test_fpr95_at_ties():
    id_s = np.zeros(100)
    assert fpr_at_95(id_s, np.zeros(10), "release") == 0.0  # equal to the threshold is not below it
    assert fpr_at_95(id_s, np.r_[np.zeros(5), -np.ones(5)], "release") == 0.5
    # OOD positive: the first threshold catching 95% of a tied OOD set flags every tied ID image too
    assert fpr_at_95(np.r_[np.zeros(50), -np.ones(50)], np.zeros(10), "ood_positive") == 0.5


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


def test_the_backbone_batch_alone_changes_the_cache_file(tiny, tmp_path):
    cfg = load_config(tiny.write(cache_dir=str(tmp_path / "cache"), extract_batch_size=8))
    ds = build_dataset("noise:uniform:16", "test", "", 32)
    extractor = build_extractor(cfg)
    a = features_for(cfg, CPU, extractor, ds, "test")
    cfg.extract_batch_size = 16
    b = features_for(cfg, CPU, extractor, ds, "test")
    assert not a.from_cache and not b.from_cache and len(os.listdir(tmp_path / "cache")) == 2
    assert torch.allclose(a.z, b.z, atol=1e-4)


def test_bf16_reaches_the_reconstruction(trained, monkeypatch):
    monkeypatch.setenv(EMULATED_BF16_ENV, "1")
    cfg = load_config(trained.config)
    ckpt = {"end": str(trained.ckpt / "checkpoint-last.pth")}
    exact = Scorer.from_checkpoints(cfg, CPU, ckpt)
    z, keys = exact.image_features(as_uint8_images(digits_uint8()[:64], cfg.backbone.input_size))
    cfg.precision = "bf16"
    fast = Scorer.from_checkpoints(cfg, CPU, ckpt)
    assert fast.mode == "bf16-autocast"
    a, b = exact.scores(z, keys), fast.scores(z, keys)  # the same vectors: only the LFDN's arithmetic differs
    assert not np.array_equal(a["MSE"], b["MSE"])
    np.testing.assert_allclose(a["MSE"], b["MSE"], rtol=0.1)


def test_our_checkpoints_schedule_is_checked(trained):
    cfg = load_config(trained.config)
    ck = load_checkpoint(str(trained.ckpt / "checkpoint-last.pth"))
    backbone = build_extractor(cfg).backbone_id(cfg.backbone.input_size)
    check_against(ck, backbone=backbone, diffusion=build_diffusion(cfg), config_source="cfg")
    for key, value in (("linear_end", 0.02), ("linear_start", 0.001), ("timesteps", 50)):
        other = copy.deepcopy(cfg)
        setattr(other.diffusion, key, value)
        if key == "timesteps":
            other.diffusion.subset_timesteps_num = 3
        with pytest.raises(UserError, match=f"diffusion.{key}"):
            check_against(ck, backbone=backbone, diffusion=build_diffusion(other), config_source="cfg")


def test_cache_path_names_the_set_split_and_key():
    key = {"dataset": {"name": "folder:dtd/images"}, "split": "test", "x": 1}
    path = cache_path("/c", key)
    assert os.path.basename(path).startswith("folder_dtd_images-test-") and path.endswith(".pt")
    assert cache_path("/c", {**key, "x": 2}) != path
    shutil.rmtree("/nonexistent", ignore_errors=True)
