"""store/checkpoint.py: our one-file format and the authors' release layout, and every way a file can be wrong."""
import copy
import os

import pytest
import torch

from engine.factory import build_diffusion, build_extractor
from errors import UserError
from experiment.config import load_config
from models.backbones import backbone
from models.diffusion import GaussianDiffusion
from models.features import BackboneId, MultiLayerFeatures
from models.lfdn import LFDN
from store.checkpoint import (
    check_against,
    load_checkpoint,
    make_payload,
    peek,
    save_checkpoint,
    weights_checksum,
)
from tests.helpers import Exploit, error_line, try_evaluate, write_release_checkpoint


def lite0(input_size: int, digest: str) -> BackboneId:
    spec = backbone("efficientnet-lite0")
    return BackboneId(name="efficientnet-lite0", weights=digest, input_size=input_size, feature_dim=512,
                      layers=tuple(range(5)), indices=tuple(spec.indices))


def small_lfdn(dim=512, seed=0):
    torch.manual_seed(seed)
    m = LFDN(in_channels=dim, time_embed_dim=16, model_channels=32, bottleneck_channels=32, out_channels=dim,
             num_res_blocks=2)
    for p in m.parameters():  # non-zero everywhere, so raw and EMA weights are told apart
        torch.nn.init.normal_(p)
    return m


def test_release_layout_loads_with_ema_weights_and_backbone(tmp_path):
    raw, ema = small_lfdn(seed=0), small_lfdn(seed=1)
    lite = MultiLayerFeatures("efficientnet-lite0")
    backbone = {k: v + 0.25 if v.is_floating_point() else v for k, v in lite.backbone.state_dict().items()}
    path = tmp_path / "release.pth"
    write_release_checkpoint(path, raw.state_dict(), ema.state_dict(), backbone, feature_dim=512)
    ck = load_checkpoint(str(path))
    assert ck.kind == "release" and ck.epoch == 149 and ck.ema["num_updates"] == 1234
    model = LFDN(**ck.lfdn_sizes())
    model.load_state_dict(ck.eval_weights)  # strict
    for name, p in model.state_dict().items():
        assert torch.equal(p, ema.state_dict()[name]), name
        assert not torch.equal(p, raw.state_dict()[name]), name
    assert torch.equal(ck.model["out.2.weight"], raw.out[2].weight)
    extractor = MultiLayerFeatures("efficientnet-lite0", state_dict=ck.backbone_state)
    assert torch.equal(extractor.backbone._conv_stem.weight, backbone["_conv_stem.weight"])
    check_against(ck, backbone=extractor.backbone_id(32), diffusion=GaussianDiffusion(), config_source="cfg")


def test_release_layout_of_the_full_b4_lfdn_loads_strictly(tmp_path):
    model = LFDN()
    sd = model.state_dict()
    path = tmp_path / "b4.pth"
    write_release_checkpoint(path, sd, sd)
    ck = load_checkpoint(str(path))
    assert ck.lfdn_sizes() == {"in_channels": 720, "model_channels": 1440, "time_embed_dim": 720,
                               "bottleneck_channels": 1440, "out_channels": 720, "num_res_blocks": 16}
    LFDN(**ck.lfdn_sizes()).load_state_dict(ck.eval_weights, strict=True)


def test_other_width_and_other_schedule_are_refused(tmp_path):
    sd = small_lfdn(dim=720).state_dict()
    path = tmp_path / "b4.pth"
    write_release_checkpoint(path, sd, sd)
    with pytest.raises(UserError, match=r"720-d features \(a efficientnet-b4 checkpoint\?\).*512-d"):
        check_against(load_checkpoint(str(path)), backbone=lite0(224, "x"), diffusion=GaussianDiffusion(),
                      config_source="cfg")
    sd = small_lfdn(dim=512).state_dict()
    write_release_checkpoint(path, sd, sd, alphas_cumprod=GaussianDiffusion(linear_end=0.03).alphas_cumprod.numpy())
    with pytest.raises(UserError, match="different noise schedule"):
        check_against(load_checkpoint(str(path)), backbone=lite0(224, "x"), diffusion=GaussianDiffusion(),
                      config_source="cfg")


def test_our_format_round_trip_and_backbone_mismatch(tmp_path):
    m = small_lfdn()
    payload = make_payload(model=m.state_dict(), ema={"decay": 0.9999, "num_updates": 3, "weights": m.state_dict()},
                           optimizer={}, scaler={}, epoch=4, config={"diffusion": {"timesteps": 100}},
                           backbone=lite0(64, "aaa"), run_id="r1")
    path = str(tmp_path / "ours.pth")
    save_checkpoint(payload, path)
    assert sorted(os.listdir(tmp_path)) == ["ours.pth"]
    ck = load_checkpoint(path)
    assert ck.kind == "dlsr" and ck.epoch == 4 and ck.ema["num_updates"] == 3
    assert ck.backbone == lite0(64, "aaa").record()
    check_against(ck, backbone=lite0(64, "aaa"), diffusion=GaussianDiffusion(), config_source="cfg")
    with pytest.raises(UserError, match="other weights"):
        check_against(ck, backbone=lite0(64, "bbb"), diffusion=GaussianDiffusion(), config_source="cfg")
    with pytest.raises(UserError, match="at 64 px"):
        check_against(ck, backbone=lite0(112, "aaa"), diffusion=GaussianDiffusion(), config_source="cfg")


def test_a_pickle_that_runs_code_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "x": Exploit(marker)}, str(path))
    with pytest.raises(UserError, match="refused to load: it asks to run code") as e:
        load_checkpoint(str(path))
    assert "GLOBAL posix.system" in str(e.value) and "False" not in str(e.value)  # what it asks for, no advice to allow it
    assert peek(str(path)) is None  # the launcher's and --resume auto's quick look
    assert not marker.exists()


def test_truncated_missing_and_foreign_files(tmp_path):
    good = tmp_path / "good.pth"
    sd = small_lfdn().state_dict()
    write_release_checkpoint(good, sd, sd, feature_dim=512)
    data = good.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(str(tmp_path / "cut.pth"))
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(str(tmp_path / "none.pth"))
    torch.save({"weights": 1}, str(tmp_path / "other.pth"))
    with pytest.raises(UserError, match="not a DLSR checkpoint"):
        load_checkpoint(str(tmp_path / "other.pth"))
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(str(tmp_path / "text.pth"))


def test_damaged_and_non_finite_checkpoints_are_refused_at_load(trained, tmp_path):
    from tests.helpers import write_release_checkpoint
    raw = torch.load(trained.ckpt / "checkpoint-last.pth", weights_only=True)
    raw["ema"]["weights"]["out.2.weight"][0, 0] += 1e-3  # a flipped bit, as far as the checksum is concerned
    torch.save(raw, tmp_path / "flipped.pth")
    line = error_line(try_evaluate(trained, tmp_path / "o", "--pretrained_ldm_ckpt", str(tmp_path / "flipped.pth")))
    assert "checksum" in line and "damaged" in line
    raw["ema"]["weights"]["out.2.weight"][0, :3] = float("nan")
    raw["checksum"] = weights_checksum(raw["model"], raw["ema"])
    torch.save(raw, tmp_path / "nan.pth")
    line = error_line(try_evaluate(trained, tmp_path / "o", "--pretrained_ldm_ckpt", str(tmp_path / "nan.pth")))
    assert "3 non-finite" in line and "out.2.weight" in line
    write_release_checkpoint(tmp_path / "release.pth", raw["model"], raw["ema"]["weights"], feature_dim=512)
    with pytest.raises(UserError, match="non-finite"):
        load_checkpoint(str(tmp_path / "release.pth"))


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


def test_a_state_dict_of_neither_layout_and_a_release_file_without_the_lfdn_are_named(tmp_path):
    torch.save({"model": {"encoder.weight": torch.ones(2)}}, str(tmp_path / "foreign.pth"))
    with pytest.raises(UserError, match=r"not a DLSR checkpoint \(neither our format nor the release's "
                                        r"'model.diffusion_model.\*' layout\)"):
        load_checkpoint(str(tmp_path / "foreign.pth"))
    torch.save({"model": {"model.diffusion_model.out.0.weight": torch.ones(2)}}, str(tmp_path / "partial.pth"))
    with pytest.raises(UserError, match=r"release checkpoint without LFDN weights \(no "
                                        r"model.diffusion_model.input_proj.1.weight\)"):
        load_checkpoint(str(tmp_path / "partial.pth"))
