"""K trials in one process as one stacked model, trained by the one loop (engine.run_group) that
trains a run alone: this file says what a step of the group is and where its numbers live (`_Group`);
what a step does around it — logging, epoch records, evaluations, divergence, hooks — is the engine's.
The noise stream, initialisation and evaluator are train.py's; capabilities.py says what a group refuses.

Trials that share an architecture (UNetConfig) and batch size — and differ in seed, noise
schedule, training subset, learning rate, EMA decay — train together. Each member keeps what
its own `train()` run would have: initialisation `build_model(model, seed)`, data order
`epoch_batches(..., seed)`, its own noise generator (t, eps) and dropout stream (stacked_model.py),
Adam moments and learning rate, EMA decay, epoch bookkeeping, hooks and resume state in train()'s
format (stacked_state.py: a member's checkpoint resumes in `train()` and the other way round).

Contract: on the CPU a member's per-step losses equal its separate `train()` run's to float
tolerance, dropout included (tests/test_stacked.py); the grouped convolutions sum in another
order, so bits differ by ~1e-7 relative per step and drift as training is chaotic. On a GPU
the dropout masks are statistically equivalent, not identical (CUDA's fused dropout kernel
has its own stream). A member whose loss becomes NaN/inf is marked FAILED with
`train()`'s DivergedError message, its hooks' `on_diverged(err)` is called, and it leaves the
group; a member that reaches its last step leaves after `on_end`; the others go on.

cuda_graph=True (CUDA only, graph_step.py): the device part of the step replayed as one CUDA graph;
with dropout 0 the losses are meant to equal the eager step's to float tolerance
(benchmarks/check_stacked_graph.py measures it); dropout masks come from each member's generator,
registered with the graph. On the CPU its graph form, run eagerly, gives the ordinary step's losses
to float tolerance, dropout included (tests/test_stacked_graph.py).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from ..capabilities import Member, check_graphable, check_stackable
from ..config import LOSSES
from ..data import epoch_batches, load_splits, steps_per_epoch
from .distributed import pick_device
from .graph_step import GraphedStep
from ..diffusion.schedules import NoiseSchedule
from ..model.stacked_model import StackedUNet
from .stacked_optim import FlatAdam, FlatEMA
from ..diffusion.stacked_sampling import StackedEps, sample_members
from .stacked_state import MemberState, load_member_state
from .engine import Run, TrainContext, run_group
from .train import TrainResult, _host_to_device, build_model, draw_noise, noise_generator, run_evaluator
from ..model.unet import UNet, count_parameters
from .validation import EpochEvalDraws, StepValDraws


@dataclass
class MemberResult:
    name: str
    status: str                          # FINISHED | FAILED
    error: str | None
    result: TrainResult


class _Run(Run):
    """One member's live state (everything but its rows of the stacked tensors)."""

    def __init__(self, group: "_Group", member: Member, splits, device: torch.device, eval_seed: int):
        tr = member.training
        self.group, self.member, self.splits, self.device = group, member, splits, device
        self.schedule = NoiseSchedule.from_config(member.diffusion.schedule_config)
        self.n_train = len(splits.train)
        if tr.batch_size > self.n_train:
            raise ValueError(f"member {member.name!r}: batch_size={tr.batch_size} is larger than the training set "
                             f"({self.n_train} images)")
        epoch_steps = steps_per_epoch(self.n_train, tr.batch_size)
        total = tr.epochs * epoch_steps
        if tr.max_steps is not None:
            total = min(total, tr.max_steps)
        self.net = build_model(member.model, tr.seed, device)       # the initialisation of train()
        self.dropout_generator = torch.Generator(device)           # ... and the dropout stream after it
        if device.type == "cpu":
            self.dropout_generator.set_state(torch.get_rng_state())
        else:
            self.dropout_generator.manual_seed(tr.seed)
        self.generator = noise_generator(tr, device)  # train()'s noise stream (rank 0), device_noise included
        self.ema_net = UNet(member.model).to(device).eval().requires_grad_(False)
        self.param_groups = torch.optim.Adam(self.net.parameters(), lr=tr.lr, betas=tr.adam_betas,
                                             eps=tr.adam_eps).state_dict()["param_groups"]
        self.eval_draws = EpochEvalDraws.of(splits, self.schedule, eval_seed, tr.train_eval_images)  # as train()
        self.step_val = StepValDraws(splits.val, self.schedule, eval_seed, tr.batch_size)            # likewise
        self.epoch_count = 0
        self._batches = (None, None)
        ctx = TrainContext(0, 0.0, self.net, self.ema_net, self.schedule, splits, device, 0, 1, epoch_steps, total,
                           MemberState(self), evaluator=run_evaluator(member.evaluation, self.schedule, splits,
                                                                      member.data, member.diffusion, device))
        super().__init__(member.name, tr, member.hooks, ctx)

    def batch_indices(self, step: int) -> torch.Tensor:
        """Indices of the batch of (0-based) step `step`, exactly as train() walks epoch_batches."""
        epoch = step // self.epoch_steps
        if self._batches[0] != epoch:
            self._batches = (epoch, epoch_batches(self.n_train, self.member.training.batch_size, epoch,
                                                  self.member.training.seed, device=self.splits.train.images.device))
        return self._batches[1][step - epoch * self.epoch_steps]

    def refresh_modules(self) -> None:
        row = self.group.row(self)
        with torch.no_grad():
            nn.utils.vector_to_parameters(self.group.model.flat[row], self.net.parameters())
            nn.utils.vector_to_parameters(self.group.ema.flat[row], self.ema_net.parameters())


class _Group:
    """The stacked tensors of the active members, row r <-> runs[r]."""

    def __init__(self, runs: list[_Run], device: torch.device, backend: str = "auto", channels_last: bool = False,
                 cuda_graph: bool = False, capture: bool = True):
        self.runs, self.device, self.step = runs, device, 0
        self.model = StackedUNet([r.net for r in runs], [r.dropout_generator for r in runs], backend, channels_last)
        tr = [r.member.training for r in runs]
        self.adam = FlatAdam(self.model.flat, [t.lr for t in tr], tr[0].adam_betas, tr[0].adam_eps,
                             capturable=cuda_graph)
        if any(t.adam_betas != tr[0].adam_betas or t.adam_eps != tr[0].adam_eps for t in tr):
            raise ValueError("training.adam_betas and training.adam_eps must be equal across a stacked group")
        self.ema = FlatEMA(self.model.flat, [t.ema_decay for t in tr], [t.ema_warmup for t in tr])
        self.epoch_sum = torch.zeros(len(runs), dtype=torch.float64, device=device)
        t_max = max(r.schedule.T for r in runs)
        pad = lambda v: torch.cat([v, v.new_zeros(t_max + 1 - len(v))])  # noqa: E731  (t <= T_k never reads it)
        self.sqrt_ab = torch.stack([pad(r.schedule.sqrt_alpha_bar) for r in runs]).to(device)
        self.sqrt_1m_ab = torch.stack([pad(r.schedule.sqrt_one_minus_alpha_bar) for r in runs]).to(device)
        self.clip = torch.tensor([t.grad_clip or math.inf for t in tr], device=device)
        # train_stacked(cuda_graph=True): the device part of the step replayed as one CUDA graph
        # (capture=False: its graph form run eagerly, for the CPU tests); rebuilt whenever rows change.
        self.capture = capture
        self.graphed = self._graphed_step() if cuda_graph else None

    def row(self, run: _Run) -> int:
        return self.runs.index(run)

    def ema_eps(self, runs: list[_Run]) -> StackedEps:
        """The stacked EMA network of these members (eval mode), for sampling."""
        params = self.model.views_of(self.ema.flat[[self.row(r) for r in runs]])
        return lambda x, t: self.model.forward(x, t, params=params, train=False)

    def keep(self, runs: list[_Run]) -> None:
        if len(runs) == len(self.runs):
            return
        if not runs:
            self.runs = []
            return
        rows = [self.row(r) for r in runs]
        self.runs = runs
        self.model.keep(rows)
        self.adam.keep(rows, self.model.flat)
        self.ema.keep(rows)
        self.epoch_sum, self.clip = self.epoch_sum[rows], self.clip[rows]
        self.sqrt_ab, self.sqrt_1m_ab = self.sqrt_ab[rows], self.sqrt_1m_ab[rows]
        if self.graphed is not None:  # new shapes and tensors: never replay the old graph; warm up, recapture
            self.graphed = self._graphed_step()

    def _graphed_step(self) -> GraphedStep:
        generators = [g for g in self.model.generators if g.device.type == "cuda"]  # the dropout streams
        return GraphedStep(self.device_step, generators=generators, capture=self.capture)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Each member's (31) with its own schedule; the float64 tables cast as NoiseSchedule does."""
        view = (*t.shape, *([1] * (x0.dim() - 2)))
        a = self.sqrt_ab.gather(1, t).to(x0.dtype).view(view)
        b = self.sqrt_1m_ab.gather(1, t).to(x0.dtype).view(view)
        return a * x0 + b * eps

    def losses(self, x0, t, eps, params=None, train=True) -> torch.Tensor:
        """(K, B) per-example ||eps - eps_theta||^2 / d."""
        pred = self.model.forward(self.q_sample(x0, t, eps), t, params=params, train=train)
        return (eps.float() - pred.float()).pow(2).flatten(2).mean(2)

    def train_step(self) -> torch.Tensor:
        """One optimizer step of every member; returns the (K,) batch losses (on the device; with
        cuda_graph the graph's static output, overwritten by the next step: clone what you keep)."""
        x0, t, eps, weights = self.draw_batch()
        if self.graphed is not None:
            loss = self.graphed(x0, t, eps)
        else:
            loss = self.device_step(x0, t, eps, weights)
        self.ema.update(self.model.flat)  # outside the graph, as in train(): one kernel either way
        self.step += 1
        self.epoch_sum += loss.double()
        for r in self.runs:
            r.epoch_count += 1
        return loss

    # --- what else the engine's loop asks of a group (engine.Group)
    @torch.no_grad()
    def step_val_losses(self) -> torch.Tensor:
        """Each member's validation minibatch (train()'s draws), its raw weights, eval mode: (K,)."""
        draws = [r.step_val.at(self.step + 1, self.device)[:3] for r in self.runs]
        x0, t, eps = (torch.stack(v) for v in zip(*draws))
        return self.losses(x0, t, eps, train=False).mean(1)

    def fetch(self, losses: list[torch.Tensor]) -> list[list[float]]:
        return torch.stack(losses).tolist()

    def epoch_train_losses(self, runs: list[_Run]) -> list[float]:
        sums = self.epoch_sum[[self.row(r) for r in runs]].tolist()
        return [s / max(r.epoch_count, 1) for r, s in zip(runs, sums)]

    def reset_epoch(self, run: _Run) -> None:
        self.epoch_sum[self.row(run)] = 0.0
        run.epoch_count = 0

    def epoch_eval_losses(self, run: _Run) -> tuple[float, float, float]:
        run.refresh_modules()
        return run.eval_draws.losses(run.ema_net, run.net, run.schedule, run.splits.val)  # train()'s computation

    def init_share(self, run: _Run) -> float:
        return self.ema.init_shares[self.row(run)]  # prod_k lambda_k, warm-up included, as train() reports it

    def refresh(self, run: _Run) -> None:
        run.refresh_modules()

    def after_eval(self) -> None:  # the members' modules are copies; the stacked forward takes train=True
        pass

    def draw_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The host part: each member's batch and its (t, eps) from its own generator, as train()
        draws them, on the device; and the (K, B) ELBO weights (None: every member's loss is simple)."""
        x0s, ts, epss = [], [], []
        for r in self.runs:
            x0s.append(r.splits.train.batch(r.batch_indices(self.step)))
            t, eps = draw_noise(r.schedule, x0s[-1].shape, r.generator)  # as train() draws them
            ts.append(t)
            epss.append(eps)
        x0, t, eps = (_stack_on(v, self.device) for v in (x0s, ts, epss))
        weights = None
        if any(r.member.diffusion.loss == "elbo" for r in self.runs):
            weights = torch.stack([r.schedule.elbo_weight(tk.cpu(), r.member.diffusion.reverse_variance).float()
                                   if r.member.diffusion.loss == "elbo" else torch.ones(len(tk))
                                   for r, tk in zip(self.runs, ts)]).to(self.device)
        return x0, t, eps, weights

    def device_step(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
        """The device part (what cuda_graph captures): q_sample, the forward with each member's
        dropout, the losses, their gradients, per-member clipping and Adam. (K,) losses."""
        err = self.losses(x0, t, eps)
        if weights is not None:
            err = err * weights
        loss = err.mean(1)
        params = self.model.param_list()
        grads = torch.autograd.grad(loss.sum(), params)
        grad = self.model.flatten_grads(grads)
        if any(r.member.training.grad_clip is not None for r in self.runs):  # clip_grad_norm_, member by member
            norms = torch.stack([torch.linalg.vector_norm(g.reshape(len(self.runs), -1), 2, dim=1) for g in grads], 1)
            coef = (self.clip / (torch.linalg.vector_norm(norms, 2, dim=1) + 1e-6)).clamp(max=1.0)
            grad = grad * coef[:, None]
        self.adam.step(grad)
        return loss.detach()


def _stack_on(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The members' tensors stacked on the device: one queued copy when all were made on the host
    (batches, CPU noise), else each moved (a member's training.device_noise drew it there)."""
    if all(v.device.type == "cpu" for v in tensors):
        return _host_to_device(torch.stack(tensors), device)
    return torch.stack([v.to(device) for v in tensors])


def _draw_eval_samples(group: _Group, runs: list[_Run]) -> None:
    """The samples of the members evaluating now (those with an evaluation config), drawn in batched
    passes, as each one's ctx.eval_samples; a member that cannot share a pass keeps None."""
    runs = [r for r in runs if r.ctx.evaluator is not None]
    if len(runs) < 2:
        return
    drawn = sample_members([r.ctx.evaluator for r in runs], [r.ema_net for r in runs],
                           lambda rows: group.ema_eps([runs[i] for i in rows]))
    for r, samples in zip(runs, drawn):
        r.ctx.eval_samples = samples


def train_stacked(members: list[Member], *, eval_seed: int = 0, device: str | torch.device | None = None,
                  deferred_sync: bool = False, backend: str = "auto", channels_last: bool = False,
                  on_group_eval: Callable[[int, dict[str, MemberState]], None] | None = None,
                  batched_sampling: bool | None = None, cuda_graph: bool = False,
                  _graph_capture: bool = True) -> list[MemberResult]:
    """Train the members as one stacked model; one MemberResult per member, in order.

    backend:       grouped (convolutions with groups=K, no vmap; default) | vmap (torch.func.vmap over
                   functional_call; also handles self-attention) | auto (grouped unless attention).
    channels_last: the grouped backend's memory layout. Off by default: on the dev CPU NHWC makes the
                   grouped convolutions ~2x faster but GroupNorm over K*G groups 3-5x slower, a net
                   loss (BENCHMARKS.md); on a GPU `bench_stacked.py --grouped-nhwc` compares both.
    deferred_sync: fetch logged losses (one sync for all members) only every `log_every` steps, at epoch
    ends, evaluations and a member's last step; hooks see the same calls with the same values, later.
    on_group_eval: called once per step at which any member evaluated, after every member's
    on_eval/on_eval_all_ranks of that step, with the state of each member still training (by
    name; those ending at this step included): one checkpoint of the whole group (Ray Train
    takes one report per step, orchestrator/ray_stacked.py).
    batched_sampling: the members evaluating at one step draw their samples in one batched pass
    through the stacked EMA network (stacked_sampling.py; the same samples). None: on a GPU only --
    on the dev CPU a forward is compute-bound and the batched pass measured 0.79x the members one
    after another (BENCHMARKS.md).
    cuda_graph:    the device part of each step (q_sample, forward, losses, gradients, clipping,
    capturable Adam) captured once as a CUDA graph and replayed; batches, noise and the EMA update
    stay outside. Recaptured whenever a member leaves (capabilities.check_graphable: its needs).
    _graph_capture=False (internal): the graph form run eagerly, for the CPU tests.
    """
    t_start = time.time()
    check_stackable(members)
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        raise ValueError("train_stacked runs in one process; DDP (world size > 1) is not supported")
    device = pick_device(device)
    if cuda_graph:
        check_graphable(members, device, backend, _graph_capture)
    for m in members:
        if m.diffusion.loss not in LOSSES:
            raise ValueError(f"member {m.name!r}: unknown loss {m.diffusion.loss!r}; allowed: {', '.join(LOSSES)}")
    split_cache: dict = {}
    group = _Group.__new__(_Group)  # runs need the group for their MemberState; filled below
    runs = []
    for m in members:
        splits = m.splits
        if splits is None:
            splits = split_cache.get(m.data) or split_cache.setdefault(m.data, load_splits(m.data))
        if m.data.on_device:
            splits = dataclasses.replace(splits, train=splits.train.to(device), val=splits.val.to(device))
        runs.append(_Run(group, m, splits, device, eval_seed))
    group.__init__(runs, device, backend, channels_last, cuda_graph, _graph_capture)
    steps = {int((m.resume_state or {}).get("step", 0)) for m in members}
    if len(steps) > 1:
        raise ValueError(f"resumed members are at different steps {sorted(steps)}: stack only members at one step")
    group.step = steps.pop()
    group.adam.set_step(group.step)  # before the members' states: load_row checks their step against it
    group.ema.updates = group.step   # one EMA update per step, as in train()
    for r in runs:
        if r.member.resume_state is not None:
            load_member_state(group, r, r.member.resume_state)
    draw = batched_sampling or (batched_sampling is None and device.type == "cuda")
    for r in runs:
        r.net.train()
    run_group(group, deferred_sync=deferred_sync, on_group_eval=on_group_eval,
              before_evals=(lambda evaluating: _draw_eval_samples(group, evaluating)) if draw else None)
    return [MemberResult(r.name, r.status, r.error,
                         TrainResult(r.end_step, math.ceil(r.end_step / r.epoch_steps), r.train_losses, r.epoch_losses,
                                     r.net, r.ema_net, r.schedule, count_parameters(r.net), r.end_time - t_start,
                                     r.val_losses))
            for r in runs]
