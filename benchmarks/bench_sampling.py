"""Sampling throughput: our U-Net + DDPM/DDIM samplers vs diffusers' UNet2DModel + DDPMScheduler/DDIMScheduler.

Same widths/blocks/groups (see bench_train_step.py), same batch, same device, same
precision, rounds alternating between the two. Reports images/s and the ratio.

    .venv/bin/python benchmarks/bench_sampling.py --batch 64 --ddim-steps 50 100 --ddpm
    .venv/bin/python benchmarks/bench_sampling.py --device cuda --batch 1024 --ddpm --bf16 --compile  # on a GPU
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP; see bench_train_step.py

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from diffusion_core import DDIMSampler, DDPMSampler, NoiseSchedule, UNet, UNetConfig  # noqa: E402

from bench_train_step import PeerAdapter, device_name, make_peer  # noqa: E402


@torch.no_grad()
def peer_sample(net, scheduler, shape, device, dtype):
    x = torch.randn(shape, device=device, dtype=dtype)
    for t in scheduler.timesteps:
        eps = net(x, t.to(device).expand(shape[0]))
        x = scheduler.step(eps, t, x).prev_sample
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ddim-steps", type=int, nargs="*", default=[50, 100])
    ap.add_argument("--ddpm", action="store_true", help="also time DDPM with all T = 1000 steps")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="torch.compile both networks as the evaluator does "
                    "(CUDA graphs on a GPU); compile time is excluded and printed")
    args = ap.parse_args()
    from diffusers import DDIMScheduler, DDPMScheduler

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = UNetConfig()
    ours = UNet(cfg).to(device).eval()
    peer = PeerAdapter(make_peer(cfg)).to(device).eval()
    sched = NoiseSchedule.make("linear", 1000)
    shape = (args.batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    cases = [(f"DDIM-{s}", DDIMSampler(sched, steps=s), DDIMScheduler(num_train_timesteps=1000), s)
             for s in args.ddim_steps]
    if args.ddpm:
        cases.append(("DDPM-1000", DDPMSampler(sched), DDPMScheduler(num_train_timesteps=1000), 1000))
    print(f"device {device} ({device_name(device)}), torch {torch.__version__}, batch {args.batch}, "
          f"{'bf16' if args.bf16 else 'fp32'}, threads {torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    nets = {"ours": ours, "peer": peer}
    if args.compile:
        from diffusion_core.evaluation import compile_for_sampling

        for label in nets:
            nets[label] = compile_for_sampling(nets[label], device)
            t0 = time.perf_counter()
            with torch.no_grad(), amp:  # compile + (on CUDA) graph capture, outside the timings
                for _ in range(3):
                    nets[label](torch.randn(shape, device=device), torch.full((args.batch,), 500, device=device))
            print(f"compile {label}: {time.perf_counter() - t0:.1f} s")
    print(f"{'sampler':<10} {'ours img/s':>11} {'peer img/s':>11} {'ratio':>6}")
    for name, ours_sampler, peer_sched, steps in cases:
        peer_sched.set_timesteps(steps)
        rates = {"ours": [], "peer": []}
        for _ in range(args.rounds):
            for label in ("ours", "peer"):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                with amp:
                    if label == "ours":
                        ours_sampler.sample(nets["ours"], shape, device=device)
                    else:
                        peer_sample(nets["peer"], peer_sched, shape, device, torch.float32)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                rates[label].append(args.batch / (time.perf_counter() - t0))
        a, b = statistics.median(rates["ours"]), statistics.median(rates["peer"])
        print(f"{name:<10} {a:>11.2f} {b:>11.2f} {a / b:>6.2f}")


if __name__ == "__main__":
    main()
