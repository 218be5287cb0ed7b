"""models/lfdn.py: the network's sizes, names, initialisation and forward pass written out."""
import math

import torch
import torch.nn.functional as F

from models.lfdn import LFDN, timestep_embedding


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


def release_lfdn_keys(blocks=16):
    """The LFDN part of docs/METHOD.md §8's key list, written out by hand (prefix model.diffusion_model. removed)."""
    keys = ["input_proj.1.weight", "input_proj.1.bias", "time_embed.0.weight", "time_embed.0.bias",
            "time_embed.2.weight", "time_embed.2.bias", "out.0.weight", "out.0.bias", "out.2.weight", "out.2.bias"]
    for n in range(blocks):
        for layer in ("in_layers.0", "in_layers.2", "emb_layers.1", "out_layers.0", "out_layers.3"):
            keys += [f"res_blocks.{n}.{layer}.weight", f"res_blocks.{n}.{layer}.bias"]
    return sorted(keys)


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


def test_lfdn_b4_size_and_release_key_names():
    model = LFDN()
    assert sum(p.numel() for p in model.parameters()) == 86_740_560
    assert sorted(model.state_dict()) == release_lfdn_keys()
    assert model.res_blocks[0].in_layers[2].weight.shape == (1440, 1440)
    assert model.res_blocks[0].emb_layers[1].weight.shape == (1440, 720)
    assert model.time_embed[0].weight.shape == (720, 1440)


def test_lfdn_starts_at_zero_output_and_keeps_shape():
    model = LFDN(in_channels=12, time_embed_dim=8, model_channels=16, bottleneck_channels=16, out_channels=12,
                 num_res_blocks=2)
    out = model(torch.randn(5, 12), torch.tensor([0, 1, 2, 3, 99]))
    assert out.shape == (5, 12)
    assert torch.count_nonzero(out) == 0  # zero-initialised head


def test_timestep_embedding_is_cos_then_sin():
    emb = timestep_embedding(torch.tensor([0, 3]), 8)
    freqs = [math.exp(-math.log(10000) * i / 4) for i in range(4)]
    expected = [math.cos(3 * f) for f in freqs] + [math.sin(3 * f) for f in freqs]
    assert torch.allclose(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert torch.allclose(emb[1], torch.tensor(expected), atol=1e-6)


def test_an_odd_embedding_width_gets_a_zero_last_column():
    t = torch.tensor([0, 5, 99])
    odd, even = timestep_embedding(t, 7), timestep_embedding(t, 6)
    assert odd.shape == (3, 7) and torch.equal(odd[:, :6], even) and torch.equal(odd[:, 6], torch.zeros(3))
