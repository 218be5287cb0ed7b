"""engine/scorer.py: the noise of each image, the EMA weights, noise draws and layer-normalised errors,
moving the state between devices."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from datasets import build_dataset, random_subset
from dlsr.detector import DLSRDetector
from dlsr.inputs import as_uint8_images
from engine.scorer import image_noise
from experiment.config import load_config
from scoring.scores import mfsim_score, mse_score
from store.checkpoint import weights_checksum
from tests.helpers import CPU, EVAL_DIGITS, FAKE_GPU, digits_uint8, evaluate, scorer_for
from utils.distributed import DistContext
from utils.precision import EMULATED_BF16_ENV


def by_hand(scorer, z, keys, role, draw):
    """(1 - cos (B, L), squared error (B, L)) of one draw, written out."""
    cfg, d = scorer.cfg, scorer.cfg.diffusion
    noise = image_noise(keys, cfg.eval.seed, role if draw == 0 else f"{role}-draw{draw}",
                        scorer.diffusion.noise_draws(d.subset_timesteps_num, d.eta, d.indexing), z.shape[1:])
    with torch.no_grad():
        rec = scorer.diffusion.reconstruct(scorer.models[role], z, d.subset_timesteps_num, d.eta, indexing=d.indexing,
                                           noise=noise)
    bounds = [0, *scorer.extractor.indices]
    cos = np.stack([F.cosine_similarity(rec[:, a:b], z[:, a:b], dim=1).double().numpy()
                    for a, b in zip(bounds[:-1], bounds[1:])], 1)
    sq = np.stack([((rec[:, a:b] - z[:, a:b]) ** 2).sum(1).double().numpy() for a, b in zip(bounds[:-1], bounds[1:])], 1)
    return 1 - cos, sq


def test_same_seed_same_scores_other_seed_other_scores(trained):
    evaluate(trained, trained.tmp / "s0a")
    evaluate(trained, trained.tmp / "s0b")
    evaluate(trained, trained.tmp / "s1", "--seed", "1")
    a, b, c = (np.load(trained.tmp / d / "scores" / "ID.npy") for d in ("s0a", "s0b", "s1"))
    assert np.array_equal(a, b)
    assert not np.array_equal(a["MFsim"], c["MFsim"])


def test_each_batch_is_scored_once_none_empty_and_a_bar_only_with_a_description(trained, monkeypatch, capsys):
    cfg = load_config(trained.config)
    cfg.eval.batch_size, cfg.eval.noise_draws = 8, 2
    scorer = scorer_for(cfg, CPU, {"end": trained.ckpt / "checkpoint-last.pth"})
    sizes, real = [], scorer._draw_scores
    monkeypatch.setattr(scorer, "_draw_scores", lambda z, k, role, draw: sizes.append((len(z), draw)) or real(z, k, role, draw))
    z = torch.randn(20, scorer.extractor.feature_dim)
    scores = scorer.reconstruction_scores(z, torch.arange(20), "end", desc="")
    assert sizes == [(8, 0), (8, 1), (8, 0), (8, 1), (4, 0), (4, 1)]  # 3 batches of 20 by 8, each draw once
    assert capsys.readouterr().err == "" and all(v.shape == (20,) for v in scores.values())
    scorer.reconstruction_scores(z[:3], torch.arange(3), "end", desc="few: ")
    assert "few: " in capsys.readouterr().err  # with a description, a bar


def test_to_moves_every_piece_of_scoring_state(tiny):
    det = DLSRDetector(tiny.write(train={"epochs": 1, "subset": 64}, eval={"layer_norm": True}))
    z = torch.randn(64, 512)
    det.fit_features(z)
    det.predict_features(z[:4])  # computes the layer statistics
    det.to("cpu")
    assert det.predict_features(z[:4]).shape == (4,)
    scorer = copy.deepcopy(det.scorer)
    assert scorer._layer_stats and scorer.train_z is not None
    scorer.mode = "fp16-autocast"  # as it was on a GPU
    scorer.to(DistContext(0, 1, 0, FAKE_GPU))
    tensors = [*scorer.extractor.parameters(), *scorer.extractor.buffers(), scorer.train_z,
               *[p for m in scorer.models.values() for p in m.parameters()],
               *[t for stats in scorer._layer_stats.values() for pair in stats.values() for t in pair]]
    assert all(t.device == FAKE_GPU for t in tensors)
    assert scorer.mode == "fp32" and scorer.ctx.device == FAKE_GPU  # the arithmetic follows the device


def test_a_scorer_is_built_on_its_contexts_device(trained):
    """The scripts' scorer (from checkpoints) holds its backbone and every LFDN on the rank's device,
    not only after a later ``to`` (the meta device stands in for a GPU here)."""
    ckpt = str(trained.ckpt / "checkpoint-last.pth")
    scorer = scorer_for(load_config(trained.config), DistContext(0, 1, 0, FAKE_GPU),
                        {"first": trained.ckpt / "checkpoint-0.pth", "end": ckpt})
    tensors = [*scorer.extractor.parameters(), *scorer.extractor.buffers(),
               *[p for m in scorer.models.values() for p in m.parameters()]]
    assert set(scorer.models) == {"first", "end"} and all(t.device == FAKE_GPU for t in tensors)


def test_lr_first_scores_use_the_first_checkpoints_own_noise_role(trained):
    ckpts = {"first": str(trained.ckpt / "checkpoint-0.pth"), "end": str(trained.ckpt / "checkpoint-last.pth")}
    cfg = load_config(trained.config)
    scorer = scorer_for(cfg, CPU, ckpts)
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
        np.testing.assert_allclose(got[f"{role}_MFsim"], mfsim_score(rec, z, scorer.layers).double().numpy(),
                                   rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got["LR_MFsim"], got["first_MFsim"] - got["end_MFsim"])


def test_bf16_reaches_the_reconstruction(trained, monkeypatch):
    monkeypatch.setenv(EMULATED_BF16_ENV, "1")
    cfg = load_config(trained.config)
    ckpt = {"end": str(trained.ckpt / "checkpoint-last.pth")}
    exact = scorer_for(cfg, CPU, ckpt)
    z, keys = exact.image_features(as_uint8_images(digits_uint8()[:64], cfg.backbone.input_size))
    cfg.precision = "bf16"
    fast = scorer_for(cfg, CPU, ckpt)
    assert fast.mode == "bf16-autocast"
    a, b = exact.scores(z, keys), fast.scores(z, keys)  # the same vectors: only the LFDN's arithmetic differs
    assert not np.array_equal(a["MSE"], b["MSE"])
    np.testing.assert_allclose(a["MSE"], b["MSE"], rtol=0.1)


def test_layer_norm_normalises_each_draw_by_its_own_statistics(tiny):
    from engine.extraction import vector_keys
    from scoring.scores import layer_errors, layer_normalised_scores
    det = DLSRDetector(tiny.write(train={"epochs": 1, "subset": 64}, eval={"layer_norm": True, "noise_draws": 2}),
                       device="cpu")
    det.fit_features(torch.randn(64, 512))
    z = torch.randn(5, 512)
    got = det.predict_features(z, all_scores=True)
    scorer, keys = det.scorer, vector_keys(z)
    assert set(scorer._layer_stats) == {("end", 0), ("end", 1)}  # each draw's once (2,000 reconstructions each)
    stats = [scorer.layer_stats("end", d) for d in (0, 1)]
    assert not torch.equal(stats[0]["MSE"][0], stats[1]["MSE"][0])  # each draw has statistics of its own
    per_draw = [layer_normalised_scores(layer_errors(scorer._reconstruct(z, keys, "end", d), z, scorer.layers,
                                                     scorer.cfg.eval), stats[d]) for d in (0, 1)]
    for t in ("MSE", "MFsim"):
        expected = (per_draw[0][t].double() / 2 + per_draw[1][t].double() / 2).numpy()
        assert np.allclose(got[t].numpy(), expected, rtol=1e-6, atol=1e-9), t


def test_the_eval_weights_are_the_ema_weights(trained, tmp_path):
    raw = torch.load(trained.ckpt / "checkpoint-last.pth", weights_only=True)
    g = torch.Generator().manual_seed(0)
    raw["ema"]["weights"] = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in raw["model"].items()}
    raw["checksum"] = weights_checksum(raw["model"], raw["ema"])
    path = tmp_path / "ema.pth"
    torch.save(raw, path)
    cfg = load_config(trained.config)
    scorer = scorer_for(cfg, CPU, {"end": str(path)})
    for k, v in scorer.models["end"].state_dict().items():
        assert torch.equal(v, raw["ema"]["weights"][k]) and not torch.equal(v, raw["model"][k]), k


def test_every_image_is_scored_and_the_last_one_as_alone(trained, baseline):
    ids = np.load(baseline / "scores" / "ID.npy")
    cfg = load_config(trained.config)
    assert len(ids) == EVAL_DIGITS == 7 * cfg.eval.batch_size + 5  # a last batch of 5
    assert np.all(ids["MSE"] != 0) and np.all(ids["MFsim"] != 0)
    scorer = scorer_for(cfg, CPU, {"end": str(trained.ckpt / "checkpoint-last.pth")})
    feats = scorer.set_features(build_dataset(cfg.eval.dataset, "test", cfg.data_path, 32))
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


def test_evaluation_scores_do_not_depend_on_the_batch_size_or_the_set(trained, tmp_path):

    evaluate(trained, tmp_path / "b64")
    evaluate(trained, tmp_path / "b17", "--batch_size", "17", "--ood", f"again={trained.cfg['eval']['dataset']}")
    a, b = np.load(tmp_path / "b64" / "scores" / "ID.npy"), np.load(tmp_path / "b17" / "scores" / "ID.npy")
    again = np.load(tmp_path / "b17" / "scores" / "again.npy")
    assert np.array_equal(b, again)  # the same images in another set: the same noise, the same scores
    for name in ("MSE", "MFsim"):
        assert np.allclose(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_noise_draws_average_the_scores_of_independent_draws(trained):
    cfg = load_config(trained.config)
    ckpt = {"end": str(trained.ckpt / "checkpoint-last.pth")}
    digits = as_uint8_images(np.round(load_digits().images[:48] * 255 / 16).astype(np.uint8), 32)
    one = scorer_for(cfg, CPU, ckpt)
    z, keys = one.image_features(digits)
    cfg4 = copy.deepcopy(cfg)
    cfg4.eval.noise_draws = 4
    four = scorer_for(cfg4, CPU, ckpt).scores(z, keys)
    draws = [by_hand(one, z, keys, "end", j) for j in range(4)]
    np.testing.assert_allclose(four["MSE"], np.mean([sq.sum(1) for _, sq in draws], 0), rtol=1e-5)
    np.testing.assert_allclose(four["MFsim"], np.mean([-(1 - c[:, 1:]).mean(1) for c, _ in draws], 0), rtol=1e-5)
    np.testing.assert_allclose(one.scores(z, keys)["MSE"], draws[0][1].sum(1), rtol=1e-5)  # draw 0 is the release's


def test_layer_norm_standardises_each_layer_by_the_training_vectors_statistics(trained):
    cfg = load_config(trained.config)
    cfg.eval.layer_norm = True
    scorer = scorer_for(cfg, CPU, {"end": str(trained.ckpt / "checkpoint-last.pth")})
    train_set = random_subset(build_dataset("digits", "train", "", 32), 256)  # the run's training set: 256 < 2000
    z_train, k_train = scorer.image_features(torch.stack([train_set[i] for i in range(len(train_set))]))
    test = as_uint8_images(np.round(load_digits().images[1500:1564] * 255 / 16).astype(np.uint8), 32)
    z, keys = scorer.image_features(test)
    got = scorer.scores(z, keys)
    cos_t, sq_t = by_hand(scorer, z_train, k_train, "end", 0)
    cos, sq = by_hand(scorer, z, keys, "end", 0)
    expected_mfsim = ((cos - cos_t.mean(0)) / cos_t.std(0, ddof=1)).mean(1)
    expected_mse = ((sq - sq_t.mean(0)) / sq_t.std(0, ddof=1)).mean(1)
    np.testing.assert_allclose(got["MFsim"], expected_mfsim, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["MSE"], expected_mse, rtol=1e-4, atol=1e-4)


def test_each_images_noise_comes_from_its_own_seed_a_63_bit_digest_of_seed_role_and_image_key():
    """docs/METHOD.md's derivation ("Noise"), by hand: sha256("SEED|ROLE|KEY"), its first 8 bytes little-endian,
    the top bit cleared (a non-negative int64); image b's noise is torch.randn from that seed."""
    import hashlib

    from engine.scorer import image_noise, noise_seed
    keys = torch.tensor([0, 1, 12345, -7, 2 ** 62 + 3] + list(range(100, 160)), dtype=torch.int64)
    for seed, role in ((0, "end"), (3, "first")):
        for key in keys.tolist():
            digest = hashlib.sha256(f"{seed}|{role}|{key}".encode()).digest()
            expected = int.from_bytes(digest[:8], "little") % 2 ** 63
            assert noise_seed(seed, role, key) == expected, (seed, role, key)
    noise = image_noise(keys[:3], 0, "end", 2, (5,))
    assert noise.shape == (2, 3, 5)
    for b, key in enumerate(keys[:3].tolist()):
        g = torch.Generator().manual_seed(noise_seed(0, "end", key))
        assert torch.equal(noise[:, b], torch.randn((2, 5), generator=g))
    assert image_noise(keys[:0], 0, "end", 2, (5,)).shape == (2, 0, 5)


def test_layer_statistics_over_more_vectors_than_one_chunk_use_each_vector_once(trained, tmp_path):
    """eval.layer_norm's statistics come from up to 2000 ID training vectors, reconstructed 1024 at a
    time: with 1500 they must equal the mean and std of the 1500 vectors' errors computed in one go."""
    from engine.scorer import LAYER_STATS_VECTORS
    from experiment.config import load_config
    from engine.extraction import vector_keys
    from scoring.scores import layer_errors
    cfg = load_config(trained.config)
    cfg.output_dir, cfg.train.epochs, cfg.eval.layer_norm = str(tmp_path / "ln"), 1, True
    z = torch.randn(1500, 512, generator=torch.Generator().manual_seed(0))
    assert 1024 < len(z) < LAYER_STATS_VECTORS
    det = DLSRDetector(cfg, device="cpu").fit_features(z)
    scorer = det.scorer
    stats = scorer.layer_stats("end", 0)
    errors = layer_errors(scorer._reconstruct(z, vector_keys(z), "end", 0), z, scorer.layers, cfg.eval)
    for name, (mean, std) in stats.items():
        torch.testing.assert_close(mean, errors[name].mean(0), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(std, errors[name].std(0) + 1e-12, rtol=1e-9, atol=1e-12)
