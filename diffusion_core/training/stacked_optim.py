"""Adam and EMA for K stacked members whose parameters are the rows of one (K, N) tensor.

Both are elementwise, so one whole-tensor op updates all K members and member k's row sees
exactly the arithmetic that `torch.optim.Adam` (its single-tensor path, the CPU default) and
`ema.EMA` apply to its own parameters: the same formulas in the same order, with per-member
learning rates and EMA decays as (K, 1) columns. Rows never mix, so a member whose loss went
NaN spoils only its own row until the group drops it.

`capturable=True` keeps the step count on the device and computes the bias corrections
there, so the update can be captured in a CUDA graph (no host value changes between replays).
"""
from __future__ import annotations

import torch

from .ema import warmup_decay


class FlatAdam:
    """Adam (Kingma & Ba 2015, as torch.optim.Adam without weight decay / amsgrad) on (K, N) rows."""

    def __init__(self, flat: torch.Tensor, lrs: list[float], betas: tuple[float, float], eps: float,
                 capturable: bool = False):
        self.flat = flat
        self.lrs = [float(v) for v in lrs]
        self.betas, self.eps, self.capturable = (float(betas[0]), float(betas[1])), float(eps), capturable
        self.exp_avg = torch.zeros_like(flat)
        self.exp_avg_sq = torch.zeros_like(flat)
        self._host_steps = 0  # the non-capturable path's counter; capturable: _step_t, on the device
        self._step_t = torch.zeros((), dtype=torch.float64, device=flat.device) if capturable else None
        self._lr_col = torch.tensor(self.lrs, dtype=torch.float64, device=flat.device)[:, None]

    @torch.no_grad()
    def step(self, grad: torch.Tensor) -> None:
        b1, b2 = self.betas
        self.exp_avg.lerp_(grad, 1 - b1)
        self.exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        if self.capturable:
            self._step_t += 1
            bc1 = 1 - torch.pow(b1, self._step_t)
            bc2_sqrt = (1 - torch.pow(b2, self._step_t)).sqrt()
        else:  # Python floats, as torch.optim.Adam's CPU path computes them
            self._host_steps += 1
            bc1 = 1 - b1 ** self._host_steps
            bc2_sqrt = (1 - b2 ** self._host_steps) ** 0.5
        denom = (self.exp_avg_sq.sqrt() / bc2_sqrt).add_(self.eps)
        if not self.capturable and len(set(self.lrs)) == 1:
            self.flat.addcdiv_(self.exp_avg, denom, value=-(self.lrs[0] / bc1))
        else:  # per-member step size lr_k / bc1, rounded to float32 as Adam rounds its scalar
            step_size = (self._lr_col / bc1).to(self.flat.dtype)
            self.flat.addcdiv_(self.exp_avg * step_size, denom, value=-1.0)

    def keep(self, rows: list[int], flat: torch.Tensor) -> None:
        self.flat = flat
        self.exp_avg, self.exp_avg_sq = self.exp_avg[rows].contiguous(), self.exp_avg_sq[rows].contiguous()
        self.lrs = [self.lrs[r] for r in rows]
        self._lr_col = self._lr_col[rows]

    def load_row(self, k: int, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int) -> None:
        if step != self.step_count:
            raise ValueError(f"resumed member at optimizer step {step}, the group at {self.step_count}: "
                             f"only members at the same step can be stacked")
        self.exp_avg[k].copy_(exp_avg)
        self.exp_avg_sq[k].copy_(exp_avg_sq)

    @property
    def step_count(self) -> int:
        """Optimizer steps taken. Capturable: read from the device counter (a sync, so only at
        checkpoints and resumes), the one a CUDA graph's replays advance; a host counter would move
        only at capture."""
        return int(self._step_t.item()) if self._step_t is not None else self._host_steps

    def set_step(self, step: int) -> None:
        self._host_steps = step
        if self._step_t is not None:
            self._step_t.fill_(step)


class FlatEMA:
    """theta_hat <- lambda_k theta_hat + (1 - lambda_k) theta per row (thesis eq. 101), as ema.EMA.update:
    lambda_k = lambda, or with a member's warm-up min(lambda, (1 + k) / (10 + k)) at the k-th update.

    The per-row weights 1 - lambda_k are computed on the device in float64 and rounded to the
    parameters' dtype, which is how `EMA`'s Python-float weight reaches its kernel: the same bits,
    and no host-to-device copy (a sync) per step. `init_shares` tracks each member's prod_k lambda_k
    on the host, as `EMA.init_share` does."""

    def __init__(self, flat: torch.Tensor, decays: list[float], warmups: list[bool] | None = None):
        for d in decays:
            if not 0.0 <= d < 1.0:
                raise ValueError(f"EMA decay={d!r} must lie in [0, 1)")
        self.flat = flat.detach().clone()
        self.decays = [float(d) for d in decays]
        self.warmups = [bool(w) for w in warmups] if warmups is not None else [False] * len(self.decays)
        self.updates = 0                            # k: updates made so far (the group's step)
        self.init_shares = [1.0] * len(self.decays)
        self._decay_col = torch.tensor(self.decays, dtype=torch.float64, device=flat.device)[:, None]
        self._warmup_col = torch.tensor(self.warmups, dtype=torch.bool, device=flat.device)[:, None]

    def current_decays(self) -> list[float]:
        """Each member's lambda_k of the next update."""
        return [warmup_decay(d, self.updates) if w else d for d, w in zip(self.decays, self.warmups)]

    @torch.no_grad()
    def update(self, params: torch.Tensor) -> None:
        decays = self.current_decays()
        if len(set(decays)) == 1:
            self.flat.lerp_(params, 1.0 - decays[0])
        else:
            ramp = warmup_decay(1.0, self.updates)  # (1 + k) / (10 + k)
            lam = torch.where(self._warmup_col, self._decay_col.clamp(max=ramp), self._decay_col)
            self.flat.lerp_(params, (1.0 - lam).to(self.flat.dtype))
        self.init_shares = [s * d for s, d in zip(self.init_shares, decays)]
        self.updates += 1

    def keep(self, rows: list[int]) -> None:
        self.flat = self.flat[rows].contiguous()
        self.decays = [self.decays[r] for r in rows]
        self.warmups = [self.warmups[r] for r in rows]
        self.init_shares = [self.init_shares[r] for r in rows]
        self._decay_col, self._warmup_col = self._decay_col[rows], self._warmup_col[rows]
