"""A stacked member's resume state, in train()'s format: MemberState.state_dict() has
TrainState.state_dict()'s keys (model, EMA, Adam moments, step, generators, epoch sums), so a member's
checkpoint resumes in train() and a train() checkpoint resumes as a member; load_member_state puts one
into the member's rows of the group's stacked tensors (stacked.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..model.stacked_model import StackedUNet

if TYPE_CHECKING:  # the group and its members' live state (stacked.py, which imports this module)
    from .stacked import _Group, _Run


@dataclass(frozen=True)
class _EMAView:
    """What hooks read of train()'s EMA: the initial weights' share prod_k lambda_k."""
    init_share: float


class MemberState:
    """A member's view of the group, with TrainState's interface (state_dict, generator, step)."""

    def __init__(self, run: "_Run"):
        self.run = run

    @property
    def step(self) -> int:
        return self.run.group.step

    @property
    def generator(self) -> torch.Generator:
        return self.run.generator

    @property
    def ema(self) -> "_EMAView":
        return _EMAView(self.run.group.ema.init_shares[self.run.group.row(self.run)])

    def state_dict(self) -> dict:
        run, group = self.run, self.run.group
        row = group.row(run)
        run.refresh_modules()
        adam, steps = group.adam, float(group.adam.step_count)  # read once: a device sync when capturable
        state = {i: {"step": torch.tensor(steps), "exp_avg": e, "exp_avg_sq": v}
                 for i, (e, v) in enumerate(zip(group.model.unflatten(adam.exp_avg[row]).values(),
                                                group.model.unflatten(adam.exp_avg_sq[row]).values()))}
        out = {"model": {k: v.clone() for k, v in run.net.state_dict().items()},
               "ema": {"decay": run.member.training.ema_decay, "warmup": run.member.training.ema_warmup,
                       "updates": group.ema.updates, "init_share": group.ema.init_shares[row],
                       "module": {k: v.clone() for k, v in run.ema_net.state_dict().items()}},
               "optimizer": {"state": state, "param_groups": run.param_groups},
               "step": group.step, "generator": run.generator.get_state(),
               "epoch_loss_sum": float(group.epoch_sum[row]), "epoch_loss_count": run.epoch_count}
        if group.device.type == "cuda":
            out["cuda_rng"], out["cpu_rng"] = run.dropout_generator.get_state(), torch.get_rng_state()
        else:
            out["cpu_rng"] = run.dropout_generator.get_state()
        return out


def load_member_state(group: "_Group", run: "_Run", state: dict) -> None:
    """Put a TrainState/MemberState.state_dict() into the member's rows (all members at one step)."""
    row, names = group.row(run), group.model.names
    group.model.flat[row].copy_(StackedUNet.flatten_state(state["model"], names))
    group.ema.flat[row].copy_(StackedUNet.flatten_state(state["ema"]["module"], names))
    ema = state["ema"]  # a state without "updates" predates the warm-up: a constant decay, one update per step
    updates, warmup = int(ema.get("updates", state["step"])), bool(ema.get("warmup", False))
    if updates != group.ema.updates or warmup != run.member.training.ema_warmup:
        raise ValueError(f"member {run.member.name!r}: its EMA state (updates {updates}, warmup {warmup}) "
                         f"does not continue training.ema_warmup="
                         f"{run.member.training.ema_warmup} at step {group.ema.updates}")
    group.ema.init_shares[row] = float(ema.get("init_share", run.member.training.ema_decay ** group.ema.updates))
    opt = [state["optimizer"]["state"][i] for i in range(len(names))]
    group.adam.load_row(row, torch.cat([s["exp_avg"].reshape(-1) for s in opt]).to(group.device),
                        torch.cat([s["exp_avg_sq"].reshape(-1) for s in opt]).to(group.device),
                        int(opt[0]["step"]) if opt else int(state["step"]))
    run.generator.set_state(state["generator"].cpu())
    run.dropout_generator.set_state((state["cuda_rng"] if group.device.type == "cuda" else state["cpu_rng"]).cpu())
    group.epoch_sum[row] = float(state["epoch_loss_sum"])
    run.epoch_count = int(state["epoch_loss_count"])
