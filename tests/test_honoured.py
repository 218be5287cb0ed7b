"""Every flag and config value that can change a number is honoured, checked against a
recomputation that does not go through the code path under test (issue: planted bugs)."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datasets import build_dataset
from models.features import IMAGENET_MEAN, IMAGENET_STD, MultiLayerFeatures, standardize
from models.lfdn import LFDN
from tests.helpers import Tiny, run_inprocess
from utils.checkpoint import weights_checksum
from utils.config import load_config
from utils.distributed import DistContext
from utils.evaluation import Scorer, image_noise
from utils.metrics import ood_metrics
from utils.training import base_lr, build_trainer

CPU = DistContext(0, 1, 0, torch.device("cpu"))


@pytest.fixture(scope="module")
def tiny_shared(tmp_path_factory):
    """A tiny config whose feature cache is shared by the tests of this module."""
    return Tiny(tmp_path_factory.mktemp("honoured"))


# ------------------------------------------------------------------------------------- features

def test_input_normalisation_of_each_backbone_by_hand():
    images = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    x = images.permute(0, 3, 1, 2).float() / 255
    lite = MultiLayerFeatures("efficientnet-lite0").normalize(images)
    assert torch.allclose(lite, (x - 0.5) / 0.5, atol=1e-6)  # Lite weights expect [-1, 1]
    b4 = MultiLayerFeatures("efficientnet-b4", weights="random").normalize(images)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(b4, (x - mean) / std, atol=1e-6)
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------- LFDN

def literal_lfdn(sd: dict, x: torch.Tensor, t: torch.Tensor, blocks: int) -> torch.Tensor:
    """docs/METHOD.md §3 written out with functional calls on the state dict."""
    def lin(name, v):
        return F.linear(v, sd[f"{name}.weight"], sd[f"{name}.bias"])

    def gn(name, v):
        return F.group_norm(v, 1, sd[f"{name}.weight"], sd[f"{name}.bias"])

    width = sd["input_proj.1.weight"].shape[0]
    half = width // 2
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(half) / half)
    emb = torch.cat([torch.cos(t.float()[:, None] * freqs), torch.sin(t.float()[:, None] * freqs)], dim=1)
    e = lin("time_embed.2", F.silu(lin("time_embed.0", emb)))
    h = lin("input_proj.1", F.silu(x))
    for n in range(blocks):
        p = f"res_blocks.{n}"
        a = lin(f"{p}.in_layers.2", F.silu(gn(f"{p}.in_layers.0", h))) + lin(f"{p}.emb_layers.1", F.silu(e))
        h = h + lin(f"{p}.out_layers.3", F.silu(gn(f"{p}.out_layers.0", a)))
    return lin("out.2", F.silu(gn("out.0", h)))


def test_lfdn_forward_equals_the_written_out_network():
    torch.manual_seed(0)
    model = LFDN(in_channels=12, time_embed_dim=8, model_channels=16, bottleneck_channels=16, out_channels=12,
                 num_res_blocks=3).eval()
    for p in model.parameters():  # non-zero everywhere, the zero-initialised layers included
        torch.nn.init.normal_(p, std=0.5)
    x, t = torch.randn(5, 12) * 2, torch.tensor([0, 1, 3, 50, 99])
    with torch.no_grad():
        ours = model(x, t)
        assert torch.allclose(ours, literal_lfdn(model.state_dict(), x, t, 3), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(ours, literal_lfdn(model.state_dict(), x.clamp(min=0), t, 3), atol=1e-3)


# ------------------------------------------------------------------------------------- training

def tiny_trainer(t: Tiny, **sections):
    cfg = load_config(t.write(**sections))
    return build_trainer(cfg, CPU), cfg


def test_training_reads_the_train_split(tiny_shared):
    # noise: sets draw other images for train and test, so the two splits can be told apart.
    trainer, cfg = tiny_trainer(tiny_shared, train={"dataset": "noise:uniform:64", "subset": None})
    extractor = trainer.extractor
    for split, same in (("train", True), ("test", False)):
        ds = build_dataset("noise:uniform:64", split, cfg.data_path, 32)
        with torch.no_grad():
            z = standardize(extractor(extractor.normalize(torch.stack([ds[i] for i in range(len(ds))]))),
                            extractor.indices)
        assert torch.allclose(trainer.cached, z, atol=1e-4) == same, split


def test_training_flags_reach_the_trainer(tiny_shared):
    args = ["--config", tiny_shared.write(), "--lr", "0.003", "--weight_decay", "0.07", "--batch_size", "16",
            "--subset", "128", "--seed", "4", "--accum_iter", "2", "--warmup_epochs", "1", "--min_lr", "1e-5",
            "--cosine_lr", "--epochs", "5", "--opt", "train.ema_decay=0.5", "--opt", "train.betas=[0.8,0.9]",
            "--opt", "lfdn.dropout=0.25", "--opt", "lfdn.num_res_blocks=3"]
    import importlib
    main = importlib.import_module("main")
    parsed = main.parse_args(args)
    from utils.cli import resolve_config
    cfg = resolve_config(parsed.config, vars(parsed), main.TRAIN_FLAGS)
    cfg.train.cosine_lr = parsed.cosine_lr
    trainer = build_trainer(cfg, CPU)
    group = trainer.optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (0.003, 0.07, (0.8, 0.9))
    assert trainer.ema.decay == 0.5 and len(trainer.model.res_blocks) == 3
    assert trainer.model.res_blocks[0].out_layers[2].p == 0.25
    assert trainer.num_samples == 128 and trainer.steps_per_epoch() == 8
    assert (cfg.train.accum_iter, cfg.train.warmup_epochs, cfg.train.min_lr, cfg.train.cosine_lr,
            cfg.train.epochs, cfg.train.seed) == (2, 1, 1e-5, True, 5, 4)


def test_blr_scales_with_the_total_batch_by_hand(tiny_shared):
    cfg = load_config(tiny_shared.write(train={"lr": None, "blr": 1e-3, "batch_size": 32, "accum_iter": 3}))
    assert base_lr(cfg, 1) == pytest.approx(1e-3 * 32 * 3 / 256)
    assert base_lr(cfg, 4) == pytest.approx(1e-3 * 32 * 3 * 4 / 256)
    trainer = build_trainer(cfg, CPU)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 32 * 3 / 256)


def test_ema_decay_is_recomputed_by_hand_over_an_epoch(tiny_shared):
    # 16 updates: from the 9th on the configured 0.5 is below the warm-up value (1 + n) / (10 + n), so a
    # decay fixed at 0.9999 (or the warm-up alone) gives other weights than the configured one.
    trainer, _ = tiny_trainer(tiny_shared, train={"ema_decay": 0.5, "lr": 1e-2, "batch_size": 16})
    seen = [{k: v.clone() for k, v in trainer.model.state_dict().items()}]
    original = trainer.ema.update

    def recording(model):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        original(model)

    trainer.ema.update = recording
    trainer.train_one_epoch(0)
    ema = dict(seen[0])
    for n, weights in enumerate(seen[1:], start=1):
        d = min(0.5, (1 + n) / (10 + n))
        ema = {k: ema[k] - (1 - d) * (ema[k] - weights[k]) for k in ema}
    assert len(seen) == 17  # 16 optimizer steps; the decay is 0.5 from the 9th on
    for k, v in trainer.ema.module.state_dict().items():
        assert torch.allclose(v, ema[k], atol=1e-6), k


def test_data_order_changes_every_epoch_and_timesteps_cover_0_to_T_minus_1(tiny_shared):
    trainer, _ = tiny_trainer(tiny_shared)
    first = [b.clone() for b in trainer.batches(0)]
    assert all(torch.equal(a, b) for a, b in zip(first, trainer.batches(0)))  # the same epoch: the same order
    assert not torch.equal(first[0], next(iter(trainer.batches(1))))
    drawn = []
    original = trainer.diffusion.training_loss

    def recording(model, x0, t, noise):
        drawn.append(t.clone())
        return original(model, x0, t, noise)

    trainer.diffusion.training_loss = recording
    for epoch in range(3):
        trainer.train_one_epoch(epoch)
    t = torch.cat(drawn)
    assert t.min() == 0 and t.max() == 99 and len(t.unique()) > 90


# ------------------------------------------------------------------------------------- evaluation

def test_the_eval_weights_are_the_ema_weights(trained, tmp_path):
    raw = torch.load(trained.ckpt / "checkpoint-last.pth", weights_only=True)
    g = torch.Generator().manual_seed(0)
    raw["ema"]["weights"] = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in raw["model"].items()}
    raw["checksum"] = weights_checksum(raw["model"], raw["ema"])
    path = tmp_path / "ema.pth"
    torch.save(raw, path)
    cfg = load_config(trained.config)
    scorer = Scorer.from_checkpoints(cfg, CPU, {"end": str(path)})
    for k, v in scorer.models["end"].state_dict().items():
        assert torch.equal(v, raw["ema"]["weights"][k]) and not torch.equal(v, raw["model"][k]), k


@pytest.fixture(scope="module")
def baseline(trained):
    out = trained.tmp / "honoured-default"
    if not out.exists():
        run_inprocess("test_mse_mfsim.py", "--pretrained_ldm_ckpt", str(trained.ckpt / "checkpoint-last.pth"),
                      "--pretrained_ldm_cfg", trained.config, "--output_dir", str(out), "--no_plots")
    return out


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
    scorer = Scorer.from_checkpoints(cfg, CPU, {"end": str(trained.ckpt / "checkpoint-last.pth")})
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
    scorer = Scorer.from_checkpoints(cfg, CPU, {"end": str(trained.ckpt / "checkpoint-last.pth")})
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


def test_every_image_is_scored_and_the_last_one_as_alone(trained, baseline):
    ids = np.load(baseline / "scores" / "ID.npy")
    assert len(ids) == 1797 and np.all(ids["MSE"] != 0) and np.all(ids["MFsim"] != 0)  # 1797 = 28 x 64 + 5
    cfg = load_config(trained.config)
    scorer = Scorer.from_checkpoints(cfg, CPU, {"end": str(trained.ckpt / "checkpoint-last.pth")})
    feats = scorer.set_features(build_dataset("digits", "test", cfg.data_path, 32))
    alone = scorer.scores(feats.z[-1:], feats.keys[-1:])
    for name in ("MSE", "MFsim"):
        assert ids[name][-1] == pytest.approx(alone[name][0], rel=1e-5)


def test_each_image_draws_its_own_noise():
    a = image_noise(torch.tensor([7, 8, 7]), 0, "end", 2, (5,))  # (draws, B, D)
    assert a.shape == (2, 3, 5)
    assert torch.equal(a[:, 0], a[:, 2]) and not torch.allclose(a[:, 0], a[:, 1])
    assert not torch.allclose(a[0], a[1])  # the start noise and the step noise are separate draws
    assert not torch.equal(a, image_noise(torch.tensor([7, 8, 7]), 1, "end", 2, (5,)))
    assert not torch.equal(a, image_noise(torch.tensor([7, 8, 7]), 0, "first", 2, (5,)))
    many = image_noise(torch.arange(512), 0, "end", 1, (64,))[0]  # independent across images
    corr = torch.corrcoef(many)
    assert corr.fill_diagonal_(0).abs().max() < 0.6


def test_backbone_layers_select_those_taps_slices(tiny_shared):
    from utils.features import standardized_features
    from utils.model_factory import build_extractor
    cfg = load_config(tiny_shared.write(backbone={"name": "efficientnet-lite0", "input_size": 32, "layers": [1, 4]}))
    part, whole = build_extractor(cfg), MultiLayerFeatures("efficientnet-lite0")
    assert (part.feature_dim, part.indices, part.raw_dim) == (24 + 320, [24, 344], 512)
    images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        raw = whole(whole.normalize(images))  # (3, 512): taps 16 | 24 | 40 | 112 | 320
    expected = standardize(torch.cat([raw[:, 16:40], raw[:, 192:512]], dim=1), [24, 344])
    assert torch.allclose(standardized_features(part, images, CPU, False), expected, atol=1e-5)
    trainer = build_trainer(cfg, CPU)
    assert trainer.model.in_channels == 344 and trainer.cached.shape[1] == 344
