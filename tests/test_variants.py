"""The opt-in score variant chosen on a validation split (bench/variants.py): N noise draws averaged
(eval.noise_draws) and layer-normalised errors (eval.layer_norm), recomputed by hand; off, the
release's scores are untouched (the other test modules pin them)."""
import copy

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from datasets import build_dataset, random_subset
from tests.helpers import run_inprocess
from utils.config import load_config
from utils.detector import as_uint8_images
from utils.distributed import DistContext
from utils.evaluation import Scorer, image_noise

CPU = DistContext(0, 1, 0, torch.device("cpu"))


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


def test_noise_draws_average_the_scores_of_independent_draws(trained):
    cfg = load_config(trained.config)
    ckpt = {"end": str(trained.ckpt / "checkpoint-last.pth")}
    digits = as_uint8_images(np.round(load_digits().images[:48] * 255 / 16).astype(np.uint8), 32)
    one = Scorer.from_checkpoints(cfg, CPU, ckpt)
    z, keys = one.image_features(digits)
    cfg4 = copy.deepcopy(cfg)
    cfg4.eval.noise_draws = 4
    four = Scorer.from_checkpoints(cfg4, CPU, ckpt).scores(z, keys)
    draws = [by_hand(one, z, keys, "end", j) for j in range(4)]
    np.testing.assert_allclose(four["MSE"], np.mean([sq.sum(1) for _, sq in draws], 0), rtol=1e-5)
    np.testing.assert_allclose(four["MFsim"], np.mean([-(1 - c[:, 1:]).mean(1) for c, _ in draws], 0), rtol=1e-5)
    np.testing.assert_allclose(one.scores(z, keys)["MSE"], draws[0][1].sum(1), rtol=1e-5)  # draw 0 is the release's


def test_layer_norm_standardises_each_layer_by_the_training_vectors_statistics(trained):
    cfg = load_config(trained.config)
    cfg.eval.layer_norm = True
    scorer = Scorer.from_checkpoints(cfg, CPU, {"end": str(trained.ckpt / "checkpoint-last.pth")})
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
