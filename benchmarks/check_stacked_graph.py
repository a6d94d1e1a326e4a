"""GPU check of train_stacked(cuda_graph=True) (issue 11): what the CPU tests cannot see.

Three members (seeds 0-2; one on the cosine schedule with another learning rate, one with gradient
clipping; member 1 stops at step 10, so the group's rows change and the graph is recaptured) train
--steps steps stacked, eager and with cuda_graph, on real MNIST. Printed per dropout rate:
  - the members' max relative per-step loss difference, graph vs eager: dropout 0 must be float noise
    (< --rtol); with dropout the masks come from the same generators at the same Philox offsets if
    the in-graph offsets equal the eager ones (then also float noise), else only statistically alike;
  - at the checkpoint of step --steps - 5 (after the recapture): each member's dropout generator
    state and Adam step equal the eager run's (replays advance the registered generators exactly
    as eager steps do; the host step counter is kept), and its weights to float tolerance.
Exit code 1 if a required check fails.

    PYTHONPATH=$PWD python benchmarks/check_stacked_graph.py --data-root /path/to/data
"""
from __future__ import annotations

import argparse
import sys

import torch


class Keep:
    """Hooks: the member's state_dict at its evaluation."""
    state = None

    def on_eval_all_ranks(self, ctx):
        if self.state is None:
            self.state = ctx.state.state_dict()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--device", default="cuda", help="cpu: the graph form run eagerly (plumbing only)")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rtol", type=float, default=1e-4)
    args = ap.parse_args()
    from diffusion_core import TrainConfig, UNetConfig, mnist_splits
    from diffusion_core.capabilities import Member
    from diffusion_core.config import DiffusionConfig
    from diffusion_core.data import Splits
    from diffusion_core.training.stacked import train_stacked

    device = torch.device(args.device)
    graph_kw = dict(cuda_graph=True) if device.type == "cuda" else dict(cuda_graph=True, _graph_capture=False)
    rng = "cuda_rng" if device.type == "cuda" else "cpu_rng"  # the dropout stream in a member's state_dict
    full = mnist_splits(args.data_root)
    splits = Splits(full.train.subset(torch.arange(2048)), full.val.subset(torch.arange(64)))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (graph form run eagerly)"
    print(f"{name}, torch {torch.__version__}; width {args.width}, {args.steps} steps")
    ok = True

    def run(dropout: float, **kw):
        model = UNetConfig(base_width=args.width, dropout=dropout)
        base = dict(epochs=100, batch_size=16, lr=1e-3, ema_decay=0.9, max_steps=args.steps, log_every_first=10 ** 6,
                    eval_start=args.steps - 5, eval_every=args.steps - 5, val_every=10 ** 6)
        hooks = [Keep() for _ in range(3)]
        specs = [(dict(seed=0), DiffusionConfig()),
                 (dict(seed=1, lr=3e-3, max_steps=10), DiffusionConfig(schedule="cosine")),
                 (dict(seed=2, grad_clip=0.05), DiffusionConfig())]
        members = [Member(TrainConfig(**{**base, **tk}), model, diffusion=d, splits=splits, hooks=h, name=f"m{i}")
                   for i, ((tk, d), h) in enumerate(zip(specs, hooks))]
        results = train_stacked(members, device=device, deferred_sync=True, **kw)
        return results, hooks

    for dropout in (0.0, 0.1):
        (eager, eager_ck), (graph, graph_ck) = run(dropout), run(dropout, **graph_kw)
        for e, g, ce, cg in zip(eager, graph, eager_ck, graph_ck):
            le = torch.tensor([v for _, v in e.result.train_losses], dtype=torch.float64)
            lg = torch.tensor([v for _, v in g.result.train_losses], dtype=torch.float64)
            rel = ((le - lg).abs() / le).max().item() if len(le) == len(lg) else float("inf")
            line = f"dropout {dropout}: {g.name} {g.status}, {len(lg)} steps, max rel loss diff graph vs eager {rel:.2e}"
            if dropout == 0.0 and not rel < args.rtol:
                ok, line = False, line + "  FAIL"
            if ce.state is not None:
                same_rng = torch.equal(ce.state[rng], cg.state[rng])
                same_step = float(ce.state["optimizer"]["state"][0]["step"]) == float(cg.state["optimizer"]["state"][0]["step"]) \
                    == ce.state["step"]
                w_rel = max(((ce.state["model"][k] - cg.state["model"][k]).abs().max()
                             / ce.state["model"][k].abs().max().clamp(min=1e-12)).item() for k in ce.state["model"])
                line += f"; at step {cg.state['step']}: dropout rng equal {same_rng}, Adam step equal {same_step}, " \
                        f"max rel weight diff {w_rel:.2e}"
                if not (same_rng and same_step) or (dropout == 0.0 and not w_rel < 100 * args.rtol):
                    ok, line = False, line + "  FAIL"
            print(line, flush=True)
    print("stacked graph check:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
