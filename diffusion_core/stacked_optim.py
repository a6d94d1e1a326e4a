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


class FlatAdam:
    """Adam (Kingma & Ba 2015, as torch.optim.Adam without weight decay / amsgrad) on (K, N) rows."""

    def __init__(self, flat: torch.Tensor, lrs: list[float], betas: tuple[float, float], eps: float,
                 capturable: bool = False):
        self.flat = flat
        self.lrs = [float(v) for v in lrs]
        self.betas, self.eps, self.capturable = (float(betas[0]), float(betas[1])), float(eps), capturable
        self.exp_avg = torch.zeros_like(flat)
        self.exp_avg_sq = torch.zeros_like(flat)
        self.step_count = 0
        self._step_t = torch.zeros((), dtype=torch.float64, device=flat.device) if capturable else None
        self._lr_col = torch.tensor(self.lrs, dtype=torch.float64, device=flat.device)[:, None]

    @torch.no_grad()
    def step(self, grad: torch.Tensor) -> None:
        b1, b2 = self.betas
        self.exp_avg.lerp_(grad, 1 - b1)
        self.exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        self.step_count += 1
        if self.capturable:
            self._step_t += 1
            bc1 = 1 - torch.pow(b1, self._step_t)
            bc2_sqrt = (1 - torch.pow(b2, self._step_t)).sqrt()
        else:  # Python floats, as torch.optim.Adam's CPU path computes them
            bc1 = 1 - b1 ** self.step_count
            bc2_sqrt = (1 - b2 ** self.step_count) ** 0.5
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

    def set_step(self, step: int) -> None:
        self.step_count = step
        if self._step_t is not None:
            self._step_t.fill_(step)


class FlatEMA:
    """theta_hat <- lambda theta_hat + (1 - lambda) theta per row (thesis eq. 101), as ema.EMA.update."""

    def __init__(self, flat: torch.Tensor, decays: list[float]):
        for d in decays:
            if not 0.0 <= d < 1.0:
                raise ValueError(f"EMA decay={d!r} must lie in [0, 1)")
        self.flat = flat.detach().clone()
        self.decays = [float(d) for d in decays]
        self._weight_col = torch.tensor([1.0 - d for d in self.decays], dtype=flat.dtype, device=flat.device)[:, None]

    @torch.no_grad()
    def update(self, params: torch.Tensor) -> None:
        if len(set(self.decays)) == 1:
            self.flat.lerp_(params, 1.0 - self.decays[0])
        else:
            self.flat.lerp_(params, self._weight_col)

    def keep(self, rows: list[int]) -> None:
        self.flat = self.flat[rows].contiguous()
        self.decays = [self.decays[r] for r in rows]
        self._weight_col = self._weight_col[rows]
