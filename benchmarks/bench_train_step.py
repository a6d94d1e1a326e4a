"""Training-step throughput of the thesis U-Net vs diffusers' UNet2DModel, side by side.

Both models get the same widths (32, 64, 128), two residual blocks per level, GroupNorm
with 16 groups, no attention, dropout 0.1, the same batch of real MNIST images, the same
DDPM loss (L_simple, linear schedule, T = 1000), the same Adam settings and the same
fast-path switches (precision, memory layout, torch.compile, fused Adam). Rounds alternate
between the two models so machine noise hits both alike; we report the median images/s of
each and their ratio (ours / peer).

    .venv/bin/pip install -e ".[bench]"
    .venv/bin/python benchmarks/bench_train_step.py --batch-sizes 16 128 --rounds 5 --threads 2

On a GPU (MFU = model FLOPs per step, counted with torch.utils.flop_counter for one
forward + backward, times steps/s, over the device's dense peak for the precision):

    python benchmarks/bench_train_step.py --device cuda --batch-sizes 16 128 512 --precision bf16 --compile

OMP_WAIT_POLICY defaults to PASSIVE here (as in tests/conftest.py): on a CPU shared with
other processes, OpenMP threads that spin-wait at every op's barrier make small ops 10-100x
slower, and more so for a model with more, smaller ops. Export OMP_WAIT_POLICY=ACTIVE to see it.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads its OpenMP runtime

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from diffusion_core import NoiseSchedule, UNet, UNetConfig, count_parameters, diffusion_loss, mnist_splits  # noqa: E402

# Dense peak TFLOP/s (no sparsity) by device-name fragment: (bf16, fp32). H100 SXM; the H200 has
# the same compute as the H100 SXM (more, faster memory). fp32 is the non-tensor-core peak; note
# that PyTorch lets cuDNN use TF32 for fp32 convolutions by default, which can exceed it.
PEAK_TFLOPS = {"H100": (989.0, 67.0), "H200": (989.0, 67.0), "A100": (312.0, 19.5)}


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


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = device_name(device)
    for key, (bf16, fp32) in PEAK_TFLOPS.items():
        if key in name:
            return 1e12 * (bf16 if precision == "bf16" else fp32)
    return None


class Stepper:
    """One training step (forward under autocast if bf16, backward, Adam) of one model."""

    def __init__(self, model, schedule, batch, device, precision: str, fused: bool, fmt=torch.contiguous_format):
        self.model, self.schedule, self.batch, self.device, self.fmt = model, schedule, batch, device, fmt
        self.fused = fused
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        self.reset()

    def reset(self):
        self.opt = torch.optim.Adam(self.model.parameters(), lr=2e-4, fused=self.fused or None)
        self.g = torch.Generator().manual_seed(0)

    def __call__(self):
        b = self.batch
        t = self.schedule.sample_timesteps(b.shape[0], generator=self.g).to(self.device)
        eps = torch.randn(b.shape, generator=self.g).to(self.device).contiguous(memory_format=self.fmt)
        with self.autocast:
            loss = diffusion_loss(self.model, self.schedule, b, t=t, eps=eps)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Stepper, steps: int, device, warmup: int = 3) -> float:
    """Seconds for `steps` optimizer steps (forward, backward, Adam), after `warmup` steps."""
    step.reset()
    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return time.perf_counter() - t0


def count_step_flops(step: Stepper) -> int:
    """FLOPs of one training step (forward + backward; Adam's elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds per model and batch size")
    ap.add_argument("--images-per-round", type=int, default=256, help="images processed per timed round")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast of the forward")
    ap.add_argument("--channels-last", action="store_true", help="NHWC memory layout for both models")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models (compile time excluded)")
    ap.add_argument("--fused-adam", choices=("auto", "on", "off"), default="auto",
                    help="fused Adam kernel for both (auto: on for CUDA, as TrainConfig does)")
    ap.add_argument("--json", default=None, help="also append the results as JSON lines to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    fused = args.fused_adam == "on" or (args.fused_adam == "auto" and device.type == "cuda")
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    cfg = UNetConfig()
    torch.manual_seed(0)
    ours = UNet(cfg).to(device, memory_format=fmt)
    peer = PeerAdapter(make_peer(cfg)).to(device, memory_format=fmt)
    n_ours, n_peer = count_parameters(ours), count_parameters(peer)
    models = {"ours": ours, "peer": peer}
    run = {k: (torch.compile(m) if args.compile else m) for k, m in models.items()}
    schedule = NoiseSchedule.make("linear", 1000)
    train = mnist_splits(args.data_root).train
    peak = peak_flops(device, args.precision)
    setting = (f"{args.precision}, {'channels_last' if args.channels_last else 'NCHW'}, "
               f"{'compiled' if args.compile else 'eager'}, Adam {'fused' if fused else 'default (for-loop on CPU)'}")
    print(f"device: {device} ({device_name(device)}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print(f"setting: {setting}" + (f"; cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}"
                                   if device.type == "cuda" else ""))
    print(f"params: ours {n_ours:,}  peer (diffusers UNet2DModel) {n_peer:,}")
    cols = f"{'batch':>6} {'ours img/s':>11} {'peer img/s':>11} {'ratio':>6} {'GFLOP/img ours':>15} {'peer':>6}"
    if peak:
        cols += f" {'MFU ours':>9} {'MFU peer':>9}"
    if device.type == "cuda":
        cols += f" {'peak MiB ours':>14} {'peer':>6}"
    print(cols)
    for bs in args.batch_sizes:
        batch = train.batch(torch.arange(bs)).to(device).contiguous(memory_format=fmt)
        steps = max(1, args.images_per_round // bs)
        steppers = {k: Stepper(m, schedule, batch, device, args.precision, fused, fmt) for k, m in run.items()}
        for k in models:  # eager FLOP count on the uncompiled module (same maths)
            models[k].train()
        flops = {k: count_step_flops(Stepper(models[k], schedule, batch, device, args.precision, fused, fmt))
                 for k in models}
        rates = {"ours": [], "peer": []}
        mem = {}
        for _ in range(args.rounds):
            for label in ("ours", "peer"):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                rates[label].append(steps * bs / time_steps(steppers[label], steps, device))
                if device.type == "cuda":
                    mem[label] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        a, b = statistics.median(rates["ours"]), statistics.median(rates["peer"])
        line = f"{bs:>6} {a:>11.1f} {b:>11.1f} {a / b:>6.2f} {flops['ours'] / bs / 1e9:>15.3f} " \
               f"{flops['peer'] / bs / 1e9:>6.3f}"
        rec = {"device": device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "precision": args.precision, "channels_last": args.channels_last, "compile": args.compile,
               "fused_adam": fused, "batch": bs, "ours_img_s": a, "peer_img_s": b, "ratio": a / b,
               "ours_rounds": rates["ours"], "peer_rounds": rates["peer"],
               "ours_flops_per_step": flops["ours"], "peer_flops_per_step": flops["peer"],
               "ours_params": n_ours, "peer_params": n_peer}
        if peak:
            mfu = {k: flops[k] / bs * r / peak for k, r in (("ours", a), ("peer", b))}
            line += f" {100 * mfu['ours']:>8.2f}% {100 * mfu['peer']:>8.2f}%"
            rec.update(peak_flops=peak, ours_mfu=mfu["ours"], peer_mfu=mfu["peer"])
        if mem:
            line += f" {mem['ours']:>14.0f} {mem['peer']:>6.0f}"
            rec.update(ours_peak_mib=mem["ours"], peer_peak_mib=mem["peer"])
        print(line, flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
