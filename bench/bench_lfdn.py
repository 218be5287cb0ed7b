"""LFDN step efficiency: training samples/s of the LFDN alone, against this machine's measured fp32
matrix-multiply rate. FLOPs per sample = 6 x (multiply-adds of every Linear): 2 forward, 4 backward.
The step includes the loss, AdamW and the EMA update. Target: utilisation >= 50%.

    python bench/bench_lfdn.py [--batch 256]
"""
import argparse

import torch
from common import paired, record, timed

from models.diffusion import GaussianDiffusion
from models.ema import EMA
from models.lfdn import LFDN
from experiment.config import Config


def main():
    release = Config().train  # the release's hyperparameters (config/Config.yaml)
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=release.batch_size, help="batch per process (default: the "
                   "release's, %(default)s)")
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = LFDN().to(device)
    ema = EMA(model)
    opt = torch.optim.AdamW(model.parameters(), lr=release.lr, weight_decay=release.weight_decay)
    diffusion = GaussianDiffusion()
    b = args.batch
    z0 = torch.randn(b, 720, device=device)

    def train_steps():
        for _ in range(args.steps):
            t = torch.randint(0, diffusion.timesteps, (b,), device=device)
            loss = diffusion.training_loss(model, z0, t, torch.randn_like(z0))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update(model)

    linear_macs = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    flops_per_sample = 6 * linear_macs
    a = torch.randn(b, 1440, device=device)
    w = torch.randn(1440, 1440, device=device)
    t_mm = timed(lambda: [a @ w for _ in range(20)], 5)
    mm_flops = 20 * 2 * b * 1440 * 1440 / t_mm
    t_train, t_mm2, _ = paired(train_steps, lambda: [a @ w for _ in range(20)], 3)
    mm_flops = max(mm_flops, 20 * 2 * b * 1440 * 1440 / t_mm2)
    samples = args.steps * b / t_train
    rows = [("LFDN", f"{sum(q.numel() for q in model.parameters()):,} parameters; batch {b}"),
            ("FLOPs per training sample (6 x Linear MACs)", f"{flops_per_sample / 1e6:.1f} M"),
            ("training samples/s (loss, backward, AdamW, EMA)", f"{samples:.0f}"),
            ("achieved GFLOP/s in training", f"{samples * flops_per_sample / 1e9:.1f}"),
            (f"fp32 matmul GFLOP/s ({b}x1440 @ 1440x1440)", f"{mm_flops / 1e9:.1f}"),
            ("utilisation (target >= 50%)", f"{100 * samples * flops_per_sample / mm_flops:.0f}%")]
    record("LFDN step efficiency", rows, f"device {device}")


if __name__ == "__main__":
    main()
