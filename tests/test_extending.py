"""docs/EXTENDING.md's three drills, run as the docs write them: a score (one function), a timm backbone
(no code), a data set kind (one module)."""
import csv
import importlib
import json
import re
import sys

import numpy as np
import pytest
import torch

import datasets
import scoring.scores
from datasets import build_dataset, known_specs
from datasets.registry import KINDS
from errors import UserError
from models.features import MultiLayerFeatures, weights_digest
from tests.helpers import ROOT, digits_uint8, run_inprocess
from utils.discovery import discover


def drill(name: str) -> str:
    """The code block under ``<!-- drill: NAME -->`` in docs/EXTENDING.md."""
    text = open(f"{ROOT}/docs/EXTENDING.md").read()
    return re.search(rf"<!-- drill: {name} -->\n```\w+\n(.*?)```", text, re.S).group(1)


@pytest.fixture
def l1_score():
    """The score drill's function, added to scoring/scores.py's namespace as if written there."""
    before = dict(scoring.scores.SCORES)
    exec(drill("score"), vars(scoring.scores))
    yield scoring.scores.SCORES["L1"]
    scoring.scores.SCORES.clear()
    scoring.scores.SCORES.update(before)


def test_a_new_score_is_one_function_and_everything_follows(trained, tmp_path, l1_score):
    assert scoring.scores.score_types() == ("MSE", "MFsim", "L1")
    out = tmp_path / "eval"
    run_inprocess("test_mse_mfsim.py", "--pretrained_ldm_ckpt", str(trained.ckpt / "checkpoint-last.pth"),
                  "--output_dir", str(out), "--no_plots", "--similarity_type", "L1", "--ood", "g=noise:gaussian:40")
    result = json.loads((out / "results.json").read_text())
    assert result["headline"] == "L1" and set(result["metrics"]) == {"L1", "MSE", "MFsim"}
    scores = np.load(out / "scores" / "g.npy")
    assert scores.dtype.names == ("L1", "MSE", "MFsim")
    assert result["metrics"]["L1"]["g"]["AUROC"] > 0.9  # noise is far from digits
    assert "## L1  (headline)" in (out / "results.md").read_text()
    # predict.py: a column of its own, and a calibration record of its own (the key holds the score list)
    digits = tmp_path / "img"
    digits.mkdir()
    from PIL import Image
    for i, img in enumerate(digits_uint8()[:3]):
        Image.fromarray(img).save(digits / f"{i}.png")
    proc = run_inprocess("predict.py", "--checkpoint", str(trained.ckpt / "checkpoint-last.pth"), "--images",
                         str(digits), "--output", str(tmp_path / "p.csv"), "--score", "L1")
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert list(rows[0]) == ["path", "MSE", "MFsim", "L1", "is_ood", "error"] and float(rows[0]["L1"]) > 0
    assert "(computed)" in proc.stderr and "L1 <=" in proc.stderr
    # the layer-normalised variant needs nothing more: L1 on each layer's slice alone
    lr = tmp_path / "ln"
    run_inprocess("test_mse_mfsim.py", "--pretrained_ldm_ckpt", str(trained.ckpt / "checkpoint-last.pth"),
                  "--output_dir", str(lr), "--no_plots", "--layer_norm", "--ood", "g=noise:gaussian:40")
    assert np.isfinite(np.load(lr / "scores" / "g.npy")["L1"]).all()


def test_a_timm_backbone_needs_no_code(tiny, tmp_path):
    """The timm drill's command on the tiny config: random weights (no internet here), 32 px."""
    args = drill("timm").split()[2:]
    assert args[:2] == ["--config", "config/demo.yaml"] and "backbone.name=timm:resnet18" in args
    cfg = tiny.write(train={"epochs": 1, "subset": 64})
    run_inprocess("main.py", "--config", cfg, *args[2:args.index("--output_dir")], "--backbone_weights", "random")
    out = tmp_path / "eval"
    run_inprocess("test_mse_mfsim.py", "--pretrained_ldm_ckpt", str(tiny.ckpt / "checkpoint-last.pth"),
                  "--output_dir", str(out), "--no_plots", "--ood", "g=noise:gaussian:40")
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["backbone"].startswith("timm:resnet18@") and meta["input_size"] == 32
    import timm
    reference = timm.create_model("resnet18", features_only=True)
    ours = MultiLayerFeatures("timm:resnet18", "random")
    assert ours.feature_dim == sum(reference.feature_info.channels()) == 64 + 64 + 128 + 256 + 512
    assert ours.spec.strides == (2, 4, 8, 16, 32)


def test_timm_weights_come_from_a_local_file_or_the_cache_and_are_refused_without(tmp_path, monkeypatch):
    import timm
    full = timm.create_model("resnet18")
    path = tmp_path / "resnet18.pth"
    torch.save(full.state_dict(), path)
    f = MultiLayerFeatures("timm:resnet18", str(path))
    used = {k: v for k, v in full.state_dict().items() if k in f.used_keys()}
    assert f.digest == weights_digest(used) and f.weights_source == str(path)
    with pytest.raises(UserError, match=r"weights file .*nope.pth does not exist \(expected the ImageNet weights of timm's resnet18"):
        MultiLayerFeatures("timm:resnet18", str(tmp_path / "nope.pth"))
    monkeypatch.setattr("models.backbones.timm_models.TimmBackbone.find_local", lambda self: None)
    with pytest.raises(UserError, match="not in the timm / Hugging Face cache .* --backbone_weights FILE"):
        MultiLayerFeatures("timm:resnet18")
    with pytest.raises(UserError, match="timm has no model 'no_such_net'"):
        MultiLayerFeatures("timm:no_such_net", "random")
    for said in ("features_only not implemented for resnet18", "first line\nsecond line"):
        def refuse(*a, said=said, **k):
            raise RuntimeError(said)
        monkeypatch.setattr(timm, "create_model", refuse)
        with pytest.raises(UserError) as e:
            MultiLayerFeatures("timm:resnet18", "random")
        assert str(e.value) == ("backbone 'timm:resnet18': timm could not build it with features_only "
                                f"(RuntimeError: {said.splitlines()[0]})")


def test_timm_weights_are_found_in_the_hugging_face_cache_or_torch_hub_folder(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from models.backbones import backbone
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    adapter = backbone("timm:resnet18")
    assert adapter.find_local() is None  # neither: refused with the message above
    hub = tmp_path / "hub" / "checkpoints" / "resnet18_a1_0-d63eafa0.pth"  # timm's own URL's file name
    hub.parent.mkdir(parents=True)
    hub.write_bytes(b"weights")
    assert adapter.find_local() == str(hub)
    repo = tmp_path / "hf" / "models--timm--resnet18.a1_in1k"  # resnet18's default tag on the Hub
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    (repo / "snapshots" / "0123abcd" / "model.safetensors").write_bytes(b"weights")
    assert adapter.find_local() == str(repo / "snapshots" / "0123abcd" / "model.safetensors")  # the cache first


def test_a_new_data_set_kind_is_one_module(tmp_path, monkeypatch, trained):
    (tmp_path / "checker.py").write_text(drill("kind"))
    monkeypatch.setattr(datasets, "__path__", [*datasets.__path__, str(tmp_path)])
    try:
        kinds = {k.name: k for k in discover("datasets", datasets.__path__, ["KIND", "KINDS"], skip=["registry"])}
        assert "checker" in kinds and set(KINDS) < set(kinds)  # found, and nothing else needed
        monkeypatch.setitem(KINDS, "checker", kinds["checker"])
        assert "checker[:N]" in known_specs()
        ds = build_dataset("checker:50", "test", str(tmp_path), 32)
        assert len(ds) == 50 and ds[0].shape == (32, 32)
        out = tmp_path / "eval"
        run_inprocess("test_mse_mfsim.py", "--pretrained_ldm_ckpt", str(trained.ckpt / "checkpoint-last.pth"),
                      "--output_dir", str(out), "--no_plots", "--ood", "board=checker:20")
        assert np.load(out / "scores" / "board.npy").shape == (20,)
        with pytest.raises(UserError, match=r"unknown dataset 'chequer:3'; known: .*checker\[:N\]"):
            build_dataset("chequer:3", "test", str(tmp_path), 32)
    finally:
        sys.modules.pop("datasets.checker", None)
        importlib.invalidate_caches()
