"""One evaluation of a training run: Residual(t) curves, a sample grid, the metrics record.

Pure PyTorch (no Ray, no MLflow): the orchestrator's worker calls `Evaluator.evaluate`
at every evaluation step, a notebook can call it on any checkpoint.

Every random draw here comes from the study-level evaluation seed (docs/ARCHITECTURE.md,
"Randomness"): the residual batch and its eps, and the starting noise of the samples
(the first `grid_images` of which form the sample grid). Two trials — or two
checkpoints of one trial — evaluated with the same seed therefore differ only through
their weights, which is what makes their curves comparable and the ensemble
decomposition possible.

The metrics (FID, IS, precision/recall, memorization) come from `diffusion_core.metrics`;
if they fail (e.g. the classifier weights are missing) the evaluation still returns the
residuals and the grid, logs a warning and leaves the metric columns out.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from . import metrics
from .config import METRIC_KEYS, REAL_DATA_KEYS, REAL_METRICS, EvalConfig
from .data import ImageSet, from_unit_range
from .diffusion.guidance import GuidedModel, balanced_labels
from .residuals import default_t_grid, residual_curve, variance_interpolation_curve
from .diffusion.samplers import make_sampler
from .diffusion.schedules import NoiseSchedule

log = logging.getLogger(__name__)



@dataclass
class EvalResult:
    t_grid: list[int]
    residuals: dict[str, list[float]]         # weights ("ema", "raw") -> Residual(t) on t_grid
    grid: torch.Tensor                         # uint8 (n, C, H, W), the first grid_images samples
    metrics: dict[str, float] = field(default_factory=dict)  # METRIC_KEYS (empty if unavailable)
    seconds: float = 0.0
    variance_interpolation: dict[str, list[float]] = field(default_factory=dict)  # learned variance: mean v per t
    samples: torch.Tensor | None = None        # uint8 (n_samples, C, H, W): every sample the metrics saw


@dataclass(frozen=True)
class DrawnSamples:
    """An evaluation's samples drawn elsewhere: a stacked group's batched pass (stacked_sampling.py)."""
    images: torch.Tensor   # uint8 (max(n_samples, grid_images), C, H, W): what Evaluator.sample returns
    seconds: float         # this member's share of the pass's wall time (added to EvalResult.seconds)


def grid_image(images_uint8: torch.Tensor, nrow: int | None = None, pad: int = 2) -> torch.Tensor:
    """Tile (n, C, H, W) uint8 images into one (H', W', C) uint8 array (for a PNG)."""
    n, c, h, w = images_uint8.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    ncol = int(math.ceil(n / nrow))
    out = torch.zeros((c, ncol * (h + pad) + pad, nrow * (w + pad) + pad), dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        out[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = \
            images_uint8[i]
    return out.permute(1, 2, 0).contiguous()


class _GraphedNetwork:
    """A CUDA-graphed network's output lives in the graph's static memory and is overwritten by
    the next replay: mark each call a new step and hand the sampler its own copy (a batch of
    images: negligible beside the forward pass)."""

    def __init__(self, compiled):
        self.compiled = compiled

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kw):
        torch.compiler.cudagraph_mark_step_begin()
        out = self.compiled(x, t, **kw)
        return tuple(o if o is None else o.clone() for o in out) if isinstance(out, tuple) else out.clone()


def compile_for_sampling(model: nn.Module, device: torch.device | str):
    """torch.compile for a fixed-shape sampling loop: CUDA graphs on a GPU ("reduce-overhead"),
    plain inductor elsewhere."""
    if torch.device(device).type == "cuda":
        return _GraphedNetwork(torch.compile(model, mode="reduce-overhead", dynamic=False))
    return torch.compile(model, dynamic=False)


def _num_classes(model: nn.Module) -> int:
    """The class count of a class-conditional U-Net, 0 for an unconditional one."""
    return model.config.num_classes if getattr(model, "label_emb", None) is not None else 0


def real_data_metrics(n: int, classifier, reference, train, *, data_root=None, seed: int = 0, is_splits: int = 5,
                      interval_halves: int = 0) -> dict[str, float]:
    """REAL_DATA_KEYS: the metrics of n MNIST test images drawn with the evaluation seed (at most the
    10,000 there are), against the reference. An Evaluator computes them once per run (they depend on
    the weights not at all); a finished study's records can be given them after the fact from its
    study file alone."""
    from .data import load_mnist

    test = load_mnist(data_root, train=False).images
    g = torch.Generator().manual_seed(seed + 2)  # apart from x_T's and the sampler's streams
    real = test[torch.randperm(len(test), generator=g)[:n]]
    rec = metrics.evaluate_samples(real, reference, classifier, train, splits=min(is_splits, real.shape[0]),
                                   interval_halves=interval_halves, interval_seed=seed + 3)
    out = {f"real_{k}": float(rec[k]) for k in REAL_METRICS}
    out["real_n_samples"] = float(real.shape[0])
    return out


class Evaluator:
    """Fixed evaluation draws for one run; `evaluate(ema_model, raw_model)` at each evaluation."""

    def __init__(self, schedule: NoiseSchedule, val: ImageSet, cfg: EvalConfig = EvalConfig(),
                 train_images: ImageSet | None = None, device: torch.device | str = "cpu",
                 reverse_variance: str = "beta", data_root=None, split_seed: int = 0):
        """data_root/split_seed name the MNIST validation split whose classifier statistics
        (cached on disk by diffusion_core.metrics) are the FID / precision-recall reference."""
        self.schedule, self.cfg, self.device = schedule, cfg, torch.device(device)
        self.data_root, self.split_seed = data_root, split_seed
        self.val, self.train_images = val, train_images
        g = torch.Generator().manual_seed(cfg.seed)
        n_res = min(cfg.residual_images, len(val))
        self.x0 = val.batch(torch.arange(n_res, device=val.images.device)).to(self.device)
        self.y0 = val.labels[:n_res].to(self.device).long()   # for class-conditional residuals
        self.eps = torch.randn(self.x0.shape, generator=g).to(self.device)
        if isinstance(cfg.t_grid, int):
            self.t_grid = default_t_grid(schedule.T, cfg.t_grid)
        else:
            self.t_grid = torch.as_tensor(sorted(set(int(t) for t in cfg.t_grid)), dtype=torch.long)
        n = max(cfg.n_samples, cfg.grid_images)
        self.x_T = torch.randn((n, *val.shape), generator=g)  # the fixed starting noise (Fig. 28)
        self.sampler = make_sampler(schedule, cfg.sampler, steps=cfg.steps, eta=cfg.eta,
                                    reverse_variance=reverse_variance, clip_x0=cfg.clip_x0)
        self._classifier = None
        self._reference = None
        self._real: dict[str, float] | None = None
        self._compiled: dict[int, tuple[nn.Module, nn.Module]] = {}
        self.num_classes = 0   # of the model last sampled: labels are asked for when > 0

    @classmethod
    def of_run(cls, cfg: EvalConfig, schedule: NoiseSchedule, splits, data, reverse_variance: str,
               device: torch.device | str) -> "Evaluator":
        """The evaluator of a training run (train(evaluation=...), a train_stacked member): its fixed
        draws over the run's validation split, the training images for memorization, and the data root
        and split seed of the metrics' reference statistics. Built once per run by the engine and
        handed to the hooks as TrainContext.evaluator."""
        return cls(schedule, splits.val, cfg, train_images=splits.train, device=device,
                   reverse_variance=reverse_variance, data_root=data.root, split_seed=data.split_seed)

    def _sampling_network(self, model: nn.Module) -> nn.Module:
        """The network the sampler calls: `model`, or its torch.compile wrapper (made once per
        module: the EMA model is the same object at every evaluation, and compiled code reads its
        current weights). On a GPU "reduce-overhead" replays each step as a CUDA graph: the
        batch shape is fixed, and at 28x28 a step is launch-bound, not compute-bound."""
        if not self.cfg.compile:
            return model
        if id(model) not in self._compiled:
            self._compiled[id(model)] = (model, compile_for_sampling(model, self.device))
        return self._compiled[id(model)][1]

    @torch.no_grad()
    def sample(self, model: nn.Module) -> torch.Tensor:
        """uint8 samples from the fixed starting noise, in batches: a function of the weights and
        the evaluation seed only (ancestral noise from a seeded generator on the sampling device)."""
        out = []
        self.num_classes = _num_classes(model)
        g = torch.Generator(device=self.device).manual_seed(self.cfg.seed + 1)
        net = self._sampling_network(model)
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")
        for lo in range(0, self.x_T.shape[0], self.cfg.batch_size):
            xT = self.x_T[lo:lo + self.cfg.batch_size].to(self.device)
            with amp:
                x = self.sampler.sample(self._eps_model(model, net, lo, xT.shape[0]), tuple(xT.shape),
                                        generator=g, device=self.device, x_T=xT)
            out.append(from_unit_range(x.float()).cpu())
        return torch.cat(out)

    def labels(self, n: int | None = None) -> torch.Tensor | None:
        """The labels the samples are asked for (class-conditional models): every class equally often."""
        n = self.x_T.shape[0] if n is None else n
        return balanced_labels(n, self.num_classes, self.device) if self.num_classes else None

    def _eps_model(self, model: nn.Module, net, lo: int, n: int):
        """What the sampler calls for samples lo..lo+n: the network, guided for a class-conditional
        model (labels fixed per sample index), returning (eps, variance output) when it is learned."""
        learned = getattr(self.sampler, "reverse_variance", None) == "learned"
        if _num_classes(model):
            y = self.labels()[lo:lo + n]
            return GuidedModel(net, y, self.cfg.guidance_scale, with_variance=learned)
        if learned:
            return lambda x, t: net(x, t, return_variance=True)
        return net

    @torch.no_grad()
    def progressive(self, model: nn.Module) -> tuple[list[int], torch.Tensor] | None:
        """Frames of the first `progressive_rows` samples from the fixed noise at the configured t's:
        (t values, uint8 (rows, frames, C, H, W)); None when no frames are configured."""
        if not self.cfg.progressive_t:
            return None
        rows = min(self.cfg.progressive_rows, self.x_T.shape[0])
        self.num_classes = _num_classes(model)
        xT = self.x_T[:rows].to(self.device)
        g = torch.Generator(device=self.device).manual_seed(self.cfg.seed + 1)
        n_steps = self.schedule.T if self.cfg.sampler == "ddpm" else len(self.sampler.timesteps)
        _, frames = self.sampler.sample(self._eps_model(model, model, 0, rows), tuple(xT.shape), generator=g,
                                        device=self.device, x_T=xT, n_frames=n_steps)
        by_t = sorted(frames, key=lambda f: -f[0])       # (t, x_t), T first, 0 (the sample) last
        chosen = []
        for want in sorted(set(self.cfg.progressive_t), reverse=True):
            chosen.append(min(by_t, key=lambda f: (abs(f[0] - want), f[0])))  # the nearest frame the sampler has
        ts = [int(t) for t, _ in chosen]
        imgs = torch.stack([from_unit_range(x.float().clamp(-1, 1)) for _, x in chosen], dim=1)
        return ts, imgs

    def _metrics(self, samples_uint8: torch.Tensor) -> dict[str, float]:
        if not self.cfg.metrics:
            return {}
        if tuple(samples_uint8.shape[1:]) != (1, 28, 28):
            if not getattr(self, "_shape_warned", False):
                log.warning("metrics need 1x28x28 MNIST samples, not %s: no metric columns", tuple(samples_uint8.shape[1:]))
                self._shape_warned = True
            return {}
        try:
            if self._classifier is None:
                self._classifier = metrics.load_classifier(self.device)
                self._reference = metrics.reference_statistics(self._classifier, "val", data_root=self.data_root,
                                                               split_seed=self.split_seed)
            train = self.train_images.images if self.train_images is not None else None
            rec = metrics.evaluate_samples(samples_uint8, self._reference, self._classifier, train,
                                           splits=min(self.cfg.is_splits, samples_uint8.shape[0]),
                                           labels=self.labels(samples_uint8.shape[0]),
                                           interval_halves=self.cfg.interval_halves, interval_seed=self.cfg.seed + 3)
            if self._real is None:
                self._real = real_data_metrics(samples_uint8.shape[0], self._classifier, self._reference, train,
                                               data_root=self.data_root, seed=self.cfg.seed,
                                               is_splits=self.cfg.is_splits, interval_halves=self.cfg.interval_halves)
        except Exception as e:  # a metrics failure must not kill a training run
            log.warning("metrics failed (%s: %s); this evaluation records no metric columns", type(e).__name__, e)
            return {}
        return {**{k: float(rec[k]) for k in METRIC_KEYS if k in rec}, **self._real}

    @torch.no_grad()
    def evaluate(self, ema_model: nn.Module, raw_model: nn.Module | None = None,
                 samples: DrawnSamples | None = None) -> EvalResult:
        """Residuals, samples and metrics of the given weights; `samples`: this evaluation's samples of
        ema_model, already drawn (by a stacked group, in one pass with its other members), else
        drawn here. The global torch RNG (the training's
        dropout stream) is left exactly as it was: every draw here has its own generator, and what
        the metrics build lazily (their classifier) consumes the global RNG only inside a fork."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return self._evaluate(ema_model, raw_model, samples)

    def _evaluate(self, ema_model: nn.Module, raw_model: nn.Module | None,
                  drawn: DrawnSamples | None = None) -> EvalResult:
        t0 = time.time()
        residuals, variance = {}, {}
        for name, net in (("ema", ema_model), ("raw", raw_model)):
            if net is None:
                continue
            was_training = net.training
            net.eval()
            y = self.y0 if getattr(net, "label_emb", None) is not None else None
            residuals[name] = residual_curve(net, self.schedule, self.x0, self.eps, self.t_grid.to(self.device),
                                             batch_size=self.cfg.batch_size, y=y).tolist()
            if getattr(getattr(net, "config", None), "learn_sigma", False):
                variance[name] = variance_interpolation_curve(net, self.schedule, self.x0, self.eps,
                                                              self.t_grid.to(self.device),
                                                              batch_size=self.cfg.batch_size, y=y).tolist()
            net.train(was_training)
        ema_model.eval()
        if drawn is None:
            samples, sample_seconds = self.sample(ema_model), 0.0
        else:
            want = (self.x_T.shape[0], *self.val.shape)
            if tuple(drawn.images.shape) != want or drawn.images.dtype != torch.uint8:
                raise ValueError(f"drawn samples: {drawn.images.dtype} {tuple(drawn.images.shape)}; this evaluation "
                                 f"draws uint8 {want}")
            samples, sample_seconds = drawn.images, drawn.seconds
            self.num_classes = _num_classes(ema_model)  # what sample() records, for the metrics' labels
        metrics = self._metrics(samples[: self.cfg.n_samples])
        return EvalResult(self.t_grid.tolist(), residuals, samples[: self.cfg.grid_images], metrics,
                          time.time() - t0 + sample_seconds, variance, samples[: self.cfg.n_samples])


__all__ = ["DrawnSamples", "EvalConfig", "EvalResult", "Evaluator", "METRIC_KEYS", "REAL_DATA_KEYS", "REAL_METRICS", "compile_for_sampling", "real_data_metrics", "grid_image"]
