"""Training-step throughput of the thesis U-Net vs diffusers' UNet2DModel, side by side.

Both models get the same widths (32, 64, 128), two residual blocks per level, GroupNorm
with 16 groups, no attention, the same batch of real MNIST images, the same DDPM loss
(L_simple, linear schedule, T = 1000) and the same Adam settings. Rounds alternate
between the two models so machine noise hits both alike; we report the median
images/s of each and their ratio (ours / peer).

    .venv/bin/pip install -e ".[bench]"
    .venv/bin/python benchmarks/bench_train_step.py --batch-sizes 16 128 --rounds 5

Run on a GPU with --device cuda.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from diffusion_core import NoiseSchedule, UNet, UNetConfig, count_parameters, diffusion_loss, mnist_splits


def make_peer(cfg: UNetConfig):
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=cfg.image_size, in_channels=cfg.in_channels, out_channels=cfg.in_channels,
        block_out_channels=cfg.widths, layers_per_block=cfg.blocks_per_level,
        down_block_types=("DownBlock2D",) * len(cfg.widths), up_block_types=("UpBlock2D",) * len(cfg.widths),
        norm_num_groups=cfg.norm_groups, dropout=cfg.dropout, add_attention=False,
    )


class PeerAdapter(torch.nn.Module):
    """diffusers returns a dataclass; the loss wants a tensor."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t):
        return self.net(x, t).sample


def time_steps(model, schedule, batch, steps: int, device) -> float:
    """Seconds for `steps` optimizer steps (forward, backward, Adam), after 3 warm-up steps."""
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    g = torch.Generator().manual_seed(0)

    def one():
        loss = diffusion_loss(model, schedule, batch, generator=None,
                              t=schedule.sample_timesteps(batch.shape[0], generator=g).to(device),
                              eps=torch.randn(batch.shape, generator=g).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds per model and batch size")
    ap.add_argument("--images-per-round", type=int, default=256, help="images processed per timed round")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data-root", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = UNetConfig()
    torch.manual_seed(0)
    ours = UNet(cfg).to(device)
    peer = PeerAdapter(make_peer(cfg)).to(device)
    schedule = NoiseSchedule.make("linear", 1000)
    train = mnist_splits(args.data_root).train
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device: {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"params: ours {count_parameters(ours):,}  peer (diffusers UNet2DModel) {count_parameters(peer):,}")
    print(f"{'batch':>6} {'ours img/s':>11} {'peer img/s':>11} {'ratio':>6}")
    for bs in args.batch_sizes:
        batch = train.batch(torch.arange(bs)).to(device)
        steps = max(1, args.images_per_round // bs)
        rates = {"ours": [], "peer": []}
        for _ in range(args.rounds):
            for label, model in (("ours", ours), ("peer", peer)):
                model.train()
                rates[label].append(steps * bs / time_steps(model, schedule, batch, steps, device))
        a, b = statistics.median(rates["ours"]), statistics.median(rates["peer"])
        print(f"{bs:>6} {a:>11.1f} {b:>11.1f} {a / b:>6.2f}")


if __name__ == "__main__":
    main()
