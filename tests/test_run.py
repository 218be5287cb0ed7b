"""experiment/run.py: what a run is comes from its checkpoint, how to score it from the YAML and flags;
resume refuses another definition, evaluation takes the checkpoint's with one line."""
import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch

from datasets import build_dataset, random_subset
from dlsr.detector import DLSRDetector, KNNDetector
from tests.helpers import ROOT, digits_uint8, last, needs_fmnist, run_inprocess


def digits_train_knn(z_train: np.ndarray, z_test: np.ndarray) -> np.ndarray:
    """kNN (k = 1) written independently: Euclidean distance between L2-normalised vectors."""
    a = z_train / np.linalg.norm(z_train, axis=1, keepdims=True)
    b = z_test / np.linalg.norm(z_test, axis=1, keepdims=True)
    return np.sqrt(np.maximum(2 - 2 * (b @ a.T), 0)).min(axis=1)


def in_progress_copy(src, dst, step=3, epoch=1):
    raw = torch.load(src, map_location="cpu", weights_only=True)
    raw["epoch"], raw["in_progress"] = epoch, {"step": step, "loss_sum": 1.5}
    torch.save(raw, dst)
    return str(dst)


def test_lr_refuses_two_checkpoints_of_the_same_epoch(trained, tmp_path):
    """A copy of a checkpoint is another file of the same epoch: LR would compare a model with itself."""
    copy = tmp_path / "copy-of-first.pth"
    shutil.copy(trained.ckpt / "checkpoint-0.pth", copy)
    proc = run_inprocess("test_LR.py", "--pretrained_ldm_ckpt_first", str(copy), "--pretrained_ldm_ckpt_end",
                         str(trained.ckpt / "checkpoint-0.pth"), "--output_dir", str(tmp_path / "lr"), check=False)
    assert proc.returncode == 2 and "(epoch 0) is not earlier than the end checkpoint" in proc.stderr


@needs_fmnist
def test_baselines_are_fitted_on_the_set_the_checkpoint_was_trained_on(tiny):
    """Trained on Fashion-MNIST classes 0-4 (a subset of 300), evaluated with a config that names
    digits: kNN must be fitted on the checkpoint's 300 Fashion-MNIST images, whose train and test
    splits differ."""
    trained = tiny.write("trained.yaml", train={"dataset": "fashion-mnist@0-4", "subset": 300, "epochs": 1})
    run_inprocess("main.py", "--config", trained)
    other = tiny.write("other.yaml", eval={"dataset": "fashion-mnist@0", "ood": {"photos": "photos:50"}})
    out = tiny.tmp / "eval"
    proc = run_inprocess("test_mse_mfsim.py", "--pretrained_ldm_ckpt", str(tiny.ckpt / "checkpoint-last.pth"),
                         "--pretrained_ldm_cfg", other, "--baselines", "knn", "--knn_k", "1", "--no_plots",
                         "--save_features", "--output_dir", str(out))
    said = [line for line in proc.stderr.splitlines() if "what a run is comes from its checkpoint" in line]
    assert len(said) == 2  # one line per value the config given contradicts, naming both
    assert "train.dataset = digits" in said[0] and "trained with fashion-mnist@0-4: using fashion-mnist@0-4" in said[0]
    assert "train.subset = 256" in said[1] and "using 300" in said[1]
    right = random_subset(build_dataset("fashion-mnist@0-4", "train", "", 32), 300)
    images = torch.stack([right[i] for i in range(len(right))])
    z_train = KNNDetector(other, device="cpu").features(images)[0].numpy()
    for name in ("ID", "photos"):
        expected = digits_train_knn(z_train, np.load(out / "features" / f"{name}.npy"))
        np.testing.assert_allclose(np.load(out / "scores" / f"{name}.npy")["kNN_k1"], expected, rtol=1e-4, atol=1e-4)


def test_a_lite0_checkpoint_with_a_b4_config_is_scored_with_its_own_backbone_and_says_so(trained):
    """What the run is (its backbone, input size, LFDN) comes from the checkpoint; the config given
    says how to score (here: its data sets, overridden by flags). One line per contradiction."""
    out = trained.tmp / "b4"
    proc = run_inprocess("test_mse_mfsim.py", "--pretrained_ldm_ckpt", str(trained.ckpt / "checkpoint-last.pth"),
                         "--pretrained_ldm_cfg", "config/Config.yaml", "--output_dir", str(out), "--no_plots",
                         "--dataset", "digits@1", "--ood", "g=noise:gaussian:20", "--data_path", trained.cfg["data_path"],
                         "--cache_dir", trained.cfg["cache_dir"], "--device", "cpu")
    said = [line for line in proc.stderr.splitlines() if "what a run is comes from its checkpoint" in line]
    assert any("backbone.name = efficientnet-b4" in s and "using efficientnet-lite0" in s for s in said)
    assert any("backbone.input_size = 224" in s and "using 32" in s for s in said)
    assert any("lfdn.num_res_blocks = 16" in s and "using 2" in s for s in said)
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["backbone"].startswith("efficientnet-lite0@") and meta["input_size"] == 32
    assert meta["eta"] == 1.0 and meta["id_dataset"] == "digits@1"  # how to score: the config given and flags


def test_resume_inside_an_epoch_with_another_batch_size_is_refused_naming_both(trained, tmp_path):
    ck = in_progress_copy(trained.ckpt / "checkpoint-last.pth", tmp_path / "stopped.pth")
    proc = run_inprocess("main.py", "--config", trained.config, "--resume", ck, "--batch_size", "64",
                         "--output_dir", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2
    assert "effective batch: 64 (64 x 1 process(es) x 1 accumulation) now, the run's 32" in last(proc)
    assert "--pre_ckpt_path" in last(proc)
    assert not (tmp_path / "out" / "log.txt").exists()  # refused before any work


def test_resume_with_another_dataset_or_accumulation_is_refused(trained, tmp_path):
    ck = str(trained.ckpt / "checkpoint-last.pth")
    common = ["--config", trained.config, "--resume", ck, "--epochs", "5", "--output_dir", str(tmp_path / "o")]
    proc = run_inprocess("main.py", *common, "--dataset", "fashion-mnist@0", check=False)
    assert proc.returncode == 2 and "train.dataset: 'fashion-mnist@0' now, the run's 'digits'" in last(proc)
    proc = run_inprocess("main.py", *common, "--accum_iter", "2", check=False)
    assert proc.returncode == 2 and "effective batch: 64" in last(proc)
    proc = run_inprocess("main.py", *common, "--seed", "3", check=False)
    assert proc.returncode == 2 and "train.seed: 3 now, the run's 0" in last(proc)


def test_lr_refuses_a_swapped_or_identical_pair(trained, tmp_path):
    first, end = str(trained.ckpt / "checkpoint-0.pth"), str(trained.ckpt / "checkpoint-last.pth")
    common = ["--pretrained_ldm_cfg", trained.config, "--output_dir", str(tmp_path / "lr"), "--no_plots"]
    proc = run_inprocess("test_LR.py", "--pretrained_ldm_ckpt_first", end, "--pretrained_ldm_ckpt_end", first, *common,
                         check=False)
    assert proc.returncode == 2 and "(epoch 2) is not earlier than the end checkpoint" in last(proc)
    proc = run_inprocess("test_LR.py", "--pretrained_ldm_ckpt_first", end, "--pretrained_ldm_ckpt_end",
                         os.path.join(str(trained.ckpt), ".", "checkpoint-last.pth"), *common, check=False)
    assert proc.returncode == 2 and "are the same file" in last(proc)
    assert not (tmp_path / "lr").exists()


def test_evaluation_without_a_config_uses_the_one_stored_in_the_checkpoint(trained, tmp_path):
    """The stored config trains on digits with Lite0 at 32 px; config/Config.yaml (b4) would be refused."""
    proc = run_inprocess("test_mse_mfsim.py", "--pretrained_ldm_ckpt", str(trained.ckpt / "checkpoint-last.pth"),
                         "--output_dir", str(tmp_path / "r"), "--no_plots", "--ood", "g=noise:gaussian:20",
                         "--dataset", "digits@1")
    meta = json.loads((tmp_path / "r" / "results.json").read_text())["meta"]
    assert meta["backbone"].startswith("efficientnet-lite0") and meta["input_size"] == 32
    assert proc.returncode == 0


def test_the_api_takes_the_run_from_the_checkpoint_as_the_scripts_do(trained, caplog):
    ck = str(trained.ckpt / "checkpoint-last.pth")
    with caplog.at_level(logging.WARNING, logger="dlsr"):
        det = DLSRDetector.from_checkpoint(ck, config=os.path.join(ROOT, "config", "Config.yaml"), device="cpu")
    assert det.cfg.backbone.name == "efficientnet-lite0" and det.cfg.backbone.input_size == 32
    assert det.cfg.eval.dataset == "cifar10"  # the settings to score with: the config given
    said = [r.getMessage() for r in caplog.records if "what a run is comes from its checkpoint" in r.getMessage()]
    assert any("Config.yaml sets backbone.name = efficientnet-b4" in s for s in said)
    plain = DLSRDetector.from_checkpoint(ck, device="cpu")
    images = digits_uint8()[:6]
    assert torch.equal(det.predict(images), plain.predict(images))  # the same run, the same scores




def test_lr_refuses_a_pair_that_is_one_file_under_two_names(trained, tmp_path):
    os.link(trained.ckpt / "checkpoint-last.pth", tmp_path / "hard-link.pth")
    proc = run_inprocess("test_LR.py", "--pretrained_ldm_ckpt_first", str(tmp_path / "hard-link.pth"),
                         "--pretrained_ldm_ckpt_end", str(trained.ckpt / "checkpoint-last.pth"),
                         "--output_dir", str(tmp_path / "lr"), check=False)
    assert proc.returncode == 2 and "are the same file" in last(proc)


def test_the_authors_files_take_config_yaml_in_every_script_and_the_api(tmp_path, caplog, monkeypatch):
    """One policy for the release's checkpoints, which store no config: the config given, else
    config/Config.yaml (the release's own settings), with one line saying so: the working folder's
    where it has one (the seed's commands run in the repository), else the repository's own."""
    import yaml

    from experiment.run import run_config
    from store.checkpoint import LoadedCheckpoint
    ck = LoadedCheckpoint(str(tmp_path / "release.pth"), "release", {}, None, 149)
    with caplog.at_level(logging.WARNING, logger="dlsr"):
        run = run_config({"end": ck})
    assert run.source.endswith(os.path.join("config", "Config.yaml")) and run.cfg.backbone.name == "efficientnet-b4"
    assert any("stores no config (an authors' release file): using" in r.getMessage() for r in caplog.records)
    monkeypatch.chdir(tmp_path)  # a folder with no config/: the repository's file
    run = run_config({"end": ck})
    assert run.source == os.path.join(ROOT, "config", "Config.yaml") and run.cfg.backbone.name == "efficientnet-b4"
    (tmp_path / "config").mkdir()  # a folder with its own config/Config.yaml: that one
    own = yaml.safe_load(open(os.path.join(ROOT, "config", "Config.yaml")))
    own["backbone"]["input_size"] = 320
    (tmp_path / "config" / "Config.yaml").write_text(yaml.safe_dump(own))
    run = run_config({"end": ck})
    assert run.source == os.path.join("config", "Config.yaml") and run.cfg.backbone.input_size == 320
    given = run_config({"end": ck}, os.path.join(ROOT, "config", "Config_resnet50.yaml"))
    assert given.cfg.backbone.name == "resnet50"  # the config given wins where the file has none


def test_keys_an_older_checkpoint_does_not_store_are_not_differences_and_release_files_are_not_resumed(trained, tmp_path):
    from errors import UserError
    from experiment.config import load_config
    from experiment.run import check_resume, checkpoints_agree, differences
    from store.checkpoint import LoadedCheckpoint, load_checkpoint
    ck = load_checkpoint(str(trained.ckpt / "checkpoint-last.pth"))
    cfg = load_config(trained.config)
    cfg.train.subset, cfg.train.dataset = 128, "photos"
    keys = ["train.subset", "train.dataset", "train.seed"]
    assert differences(cfg, ck, keys) == [("train.subset", 128, 256), ("train.dataset", "photos", "digits")]
    older = LoadedCheckpoint(ck.path, "dlsr", ck.model, ck.ema, ck.epoch,
                             config={s: {k: v for k, v in section.items() if k != "subset"} if s == "train" else section
                                     for s, section in ck.config.items()})
    assert differences(cfg, older, keys) == [("train.dataset", "photos", "digits")]  # subset: not stored, skipped
    release = LoadedCheckpoint(str(tmp_path / "release.pth"), "release", ck.model, None, 149)
    with pytest.raises(UserError, match=r"release.pth: --resume takes a checkpoint written by this trainer; use "
                                        r"--pre_ckpt_path to start from a release checkpoint"):
        check_resume(load_config(trained.config), 1, release)
    a = LoadedCheckpoint("a.pth", "release", {}, None, 0, backbone_state={"w": torch.zeros(3)})
    b = LoadedCheckpoint("b.pth", "release", {}, None, 149, backbone_state={"w": torch.ones(3)})
    with pytest.raises(UserError, match="the checkpoints carry different backbone weights"):
        checkpoints_agree({"first": a, "end": b})
    checkpoints_agree({"first": a, "end": LoadedCheckpoint("c.pth", "release", {}, None, 149,
                                                           backbone_state={"w": torch.zeros(3)})})


# What a run is (docs/OPERATIONS.md, "A resumed run is the same run"), each key with a value the tiny
# run was not trained with; what shapes a resumed run's trajectory; and settings of how to score it.
RUN_DEFINITION = {
    "backbone.name": "efficientnet-b4", "backbone.input_size": 48, "backbone.layers": [1, 2, 3, 4],
    "lfdn.model_channels": 96, "lfdn.time_embed_dim": 16, "lfdn.bottleneck_channels": 80, "lfdn.num_res_blocks": 3,
    "lfdn.dropout": 0.5, "diffusion.timesteps": 200, "diffusion.linear_start": 0.001, "diffusion.linear_end": 0.03,
    "train.dataset": "photos", "train.subset": 100, "train.seed": 9}
TRAJECTORY = {"train.cosine_lr": True, "train.warmup_epochs": 3}
HOW_TO_SCORE = {"diffusion.subset_timesteps_num": 5, "diffusion.eta": 0.5, "eval.batch_size": 7, "eval.seed": 4,
                "train.epochs": 9, "train.lr": 0.5, "device": "auto"}


def test_each_key_of_a_runs_definition_comes_from_its_checkpoint_and_a_resume_names_each_one_changed(trained):
    from errors import UserError
    from experiment.config import load_config, value_at
    from experiment.run import adopt_run, check_resume
    from store.checkpoint import load_checkpoint
    ck = load_checkpoint(str(trained.ckpt / "checkpoint-last.pth"))
    for key, value in {**RUN_DEFINITION, **TRAJECTORY, **HOW_TO_SCORE}.items():
        cfg = load_config(trained.config)
        section, _, leaf = key.rpartition(".")
        theirs = value_at(cfg, key)
        assert value != theirs, key
        setattr(getattr(cfg, section) if section else cfg, leaf, value)
        adopted = adopt_run(cfg, ck, "the test", say=False)
        assert value_at(adopted, key) == (theirs if key in RUN_DEFINITION else value), key
        cfg = load_config(trained.config)
        setattr(getattr(cfg, section) if section else cfg, leaf, value)
        if key in HOW_TO_SCORE:
            check_resume(cfg, 1, ck)  # how to score, epochs, lr: a resume may change them
        else:
            with pytest.raises(UserError) as e:
                check_resume(cfg, 1, ck)
            assert f"but {key}: {value!r} now, the run's {theirs!r}. Resume with" in str(e.value), key


def test_a_resume_keeps_the_effective_batch_however_it_is_made_up(trained):
    from errors import UserError
    from experiment.config import load_config
    from experiment.run import check_resume
    from store.checkpoint import load_checkpoint
    ck = load_checkpoint(str(trained.ckpt / "checkpoint-last.pth"))  # batch 32 on one process
    for batch, world, accum, same in ((32, 1, 1, True), (16, 2, 1, True), (8, 2, 2, True), (16, 1, 2, True),
                                      (16, 1, 1, False), (32, 2, 1, False), (32, 1, 2, False)):
        cfg = load_config(trained.config)
        cfg.train.batch_size, cfg.train.accum_iter = batch, accum
        if same:
            check_resume(cfg, world, ck)
        else:
            with pytest.raises(UserError, match=rf"effective batch: {batch * world * accum} \({batch} x {world} "
                                                rf"process\(es\) x {accum} accumulation\) now, the run's 32 \(32 x 1 "):
                check_resume(cfg, world, ck)
