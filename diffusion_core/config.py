"""The configs of a trial -- the dataclasses a study file's sections are -- without torch.

    data: DataConfig   model: UNetConfig   diffusion: DiffusionConfig (its schedule: ScheduleConfig)
    training: TrainConfig   evaluation: EvalConfig

They live apart from the code that runs them (data.py, unet.py, train.py, evaluation.py import
them from here) so that checking a study file -- `studyctl validate`, the plan, the capability
table -- imports neither torch nor numpy: a config is plain values, and each class checks its
own fields in __post_init__, naming the field and what is allowed. Also here: the metric
columns of the `evals` table, which the record schemas need.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args


# ------------------------------------------------------------------------------ data
DATA_ROOT_ENV = "STUDYCTL_DATA_ROOT"
Dataset = Literal["mnist", "cifar10", "molrg"]
MolrgBasis = Literal["mnist", "random"]
SubsetMode = Literal["disjoint", "bootstrap"]
DATASETS, SUBSET_MODES = get_args(Dataset), get_args(SubsetMode)
MNIST_TRAIN, MNIST_VAL = 48_000, 12_000  # thesis 2.5.3: 80/20 split of the 60k training images
CIFAR10_TRAIN, CIFAR10_VAL = 40_000, 10_000  # the 50k training images, same 80/20 split
MOLRG_TEST = 10_000  # the molrg held-out test draws (as MNIST's test set)
# The one place the split sizes and native image sizes live (study validation reads them here).
# molrg mirrors MNIST: 48,000 training and 12,000 validation draws of 1x28x28.
SPLIT_SIZES = {"mnist": (MNIST_TRAIN, MNIST_VAL), "cifar10": (CIFAR10_TRAIN, CIFAR10_VAL),
               "molrg": (MNIST_TRAIN, MNIST_VAL)}
NATIVE_IMAGE_SIZE = {"mnist": 28, "cifar10": 32, "molrg": 28}
IMAGE_CHANNELS = {"mnist": 1, "cifar10": 3, "molrg": 1}

def resolve_data_root(root: str | os.PathLike | None = None) -> Path:
    """The caller's root, else $STUDYCTL_DATA_ROOT, else ./data."""
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    env = os.environ.get(DATA_ROOT_ENV)
    return Path(env).expanduser() if env else Path("data")

@dataclass(frozen=True)
class DataConfig:
    dataset: Dataset = "mnist"
    root: str | None = None           # None: $STUDYCTL_DATA_ROOT, else ./data
    split_seed: int = 0               # the seeded 48,000 / 12,000 split (thesis 2.5.3)
    subset_size: int | None = None    # None: the whole training split
    subset_index: int = 0             # which subset (the variance study trains on several)
    subset_mode: SubsetMode = "disjoint"
    data_seed: int = 0                # drives subset selection, identical across trials
    image_size: int | None = None     # None: native (28 MNIST, 32 CIFAR); larger zero-pads
    val_size: int | None = None       # None: the whole validation split; else its first N
    on_device: bool = True            # keep the whole set as one tensor on the training device
    # dataset molrg only (molrg.py): the mixture's rank r, isotropic floor sigma_0^2, bases (mnist: each digit's
    # top-r principal directions and mean; random: Wang et al.'s random subspaces, zero means) and components.
    molrg_rank: int = 16
    molrg_floor: float = 1e-3
    molrg_basis: MolrgBasis = "mnist"
    molrg_components: int = 10

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; allowed: {', '.join(DATASETS)}")
        if self.dataset != "molrg":
            for f, default in MOLRG_DEFAULTS.items():
                if getattr(self, f) != default:
                    raise ValueError(f"DataConfig.{f}={getattr(self, f)!r} applies only to dataset 'molrg' (this is "
                                     f"{self.dataset!r}); allowed: remove it, or data.dataset: molrg")
            return
        if self.molrg_basis not in get_args(MolrgBasis):
            raise ValueError(f"DataConfig.molrg_basis={self.molrg_basis!r}; allowed: {', '.join(get_args(MolrgBasis))}")
        if not 1 <= self.molrg_rank <= 783:
            raise ValueError(f"DataConfig.molrg_rank={self.molrg_rank!r}; allowed: 1..783 (below d = 784 pixels)")
        if not self.molrg_floor > 0:
            raise ValueError(f"DataConfig.molrg_floor={self.molrg_floor!r}; allowed: > 0 (the isotropic variance "
                             f"sigma_0^2 that makes each component's covariance invertible)")
        most = 10 if self.molrg_basis == "mnist" else 100
        if not 1 <= self.molrg_components <= most:
            raise ValueError(f"DataConfig.molrg_components={self.molrg_components!r}; allowed: 1..{most} "
                             f"({'one per digit' if most == 10 else 'random subspaces'})")
        if self.image_size not in (None, 28):
            raise ValueError(f"DataConfig.image_size={self.image_size!r}; molrg draws are 28x28: allowed: null or 28")


MOLRG_DEFAULTS = {f: getattr(DataConfig, f) for f in ("molrg_rank", "molrg_floor", "molrg_basis", "molrg_components")}


# ------------------------------------------------------------------------------ model
@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 1                       # 1 for MNIST, 3 for CIFAR-10
    image_size: int = 28                       # must halve len(channel_mult) - 1 times
    base_width: int = 32                       # thesis: 32
    channel_mult: tuple[int, ...] = (1, 2, 4)  # thesis: widths 32 * (1, 2, 4)
    blocks_per_level: int = 2                  # thesis: 2 residual blocks per level
    bottleneck_blocks: int = 2                 # residual blocks at the lowest resolution
    dropout: float = 0.1                       # thesis: 0.1
    attention: bool = False                    # self-attention in the bottleneck (lowest res)
    attention_heads: int = 4
    norm_groups: int = 16                      # thesis: GroupNorm(16) ...
    final_norm_groups: int = 4                 # ... and GroupNorm(4) before the output conv
    learn_sigma: bool = False                  # also output v: the learned reverse variance (iDDPM)
    class_conditional: bool = False            # a label embedding added to the time embedding (CFG)
    num_classes: int = 10                      # labels 0..num_classes-1; num_classes is the null label

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        self.validate()

    def validate(self) -> None:
        def bad(field_name, value, allowed):
            raise ValueError(f"UNetConfig.{field_name}={value!r} is invalid; allowed: {allowed}")
        if self.in_channels < 1:
            bad("in_channels", self.in_channels, "an integer >= 1")
        if not isinstance(self.base_width, int) or self.base_width < 2:
            # Width 1 puts one channel in each GroupNorm group, which erases the time embedding (above).
            bad("base_width", self.base_width, "an integer >= 2 (one channel per GroupNorm group would erase "
                "the time embedding; thesis: 32)")
        if len(self.channel_mult) < 1 or any((not isinstance(m, int)) or m < 1 for m in self.channel_mult):
            bad("channel_mult", self.channel_mult, "a non-empty tuple of integers >= 1 (thesis: (1, 2, 4))")
        if self.blocks_per_level < 1:
            bad("blocks_per_level", self.blocks_per_level, "an integer >= 1 (thesis: 2)")
        if self.bottleneck_blocks < 0:
            bad("bottleneck_blocks", self.bottleneck_blocks, "an integer >= 0")
        if not 0.0 <= self.dropout < 1.0:
            bad("dropout", self.dropout, "a float in [0, 1)")
        if self.class_conditional and self.num_classes < 1:
            bad("num_classes", self.num_classes, "an integer >= 1")
        if self.norm_groups < 1 or self.final_norm_groups < 1:
            bad("norm_groups", (self.norm_groups, self.final_norm_groups), "integers >= 1")
        size = self.image_size
        if size < 1:
            bad("image_size", size, "a positive integer")
        for level in range(len(self.channel_mult) - 1):
            if size % 2:
                raise ValueError(
                    f"UNetConfig.image_size={self.image_size} cannot be halved {len(self.channel_mult) - 1} "
                    f"times (odd size {size} at level {level}); allowed: sizes divisible by "
                    f"2**{len(self.channel_mult) - 1}={2 ** (len(self.channel_mult) - 1)}, e.g. 28 or 32 "
                    f"for 3 levels, or fewer levels in channel_mult")
            size //= 2

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.base_width * m for m in self.channel_mult)


# ------------------------------------------------------------------------------ diffusion
Schedule = Literal["linear", "cosine", "quadratic", "sigmoid"]
SCHEDULES = get_args(Schedule)
Loss = Literal["simple", "elbo", "hybrid"]      # losses.py
LOSSES = get_args(Loss)


@dataclass(frozen=True)
class ScheduleConfig:
    name: Schedule = "linear"    # linear (thesis)
    T: int = 1000                # number of diffusion steps (thesis: 1000)
    beta_start: float = 1e-4     # linear/quadratic/sigmoid only (thesis: 1e-4)
    beta_end: float = 0.02       # linear/quadratic/sigmoid only (thesis: 0.02)


ReverseVariance = Literal["beta", "beta_tilde", "learned"]
Precision = Literal["fp32", "bf16"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
# compile modes that replay their own CUDA graphs (cuda_graph cannot capture those a second time)
GRAPHING_COMPILE_MODES = ("reduce-overhead", "max-autotune")
REVERSE_VARIANCES, PRECISIONS, COMPILE_MODES = get_args(ReverseVariance), get_args(Precision), get_args(CompileMode)


@dataclass(frozen=True)
class DiffusionConfig:
    # The noise schedule's fields, flat (a study file's `diffusion:` section is this class); the
    # defaults are ScheduleConfig's, the thesis's: linear 1e-4..0.02, T=1000.
    T: int = ScheduleConfig.T
    schedule: Schedule = ScheduleConfig.name
    beta_start: float = ScheduleConfig.beta_start
    beta_end: float = ScheduleConfig.beta_end
    reverse_variance: ReverseVariance = "beta"   # sigma_t^2 for sampling and the ELBO weight
    loss: Loss = "simple"            # simple (eq. 72, thesis) | elbo (eq. 70) | hybrid (iDDPM, with learned)

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; allowed: {', '.join(LOSSES)}")
        if self.reverse_variance not in REVERSE_VARIANCES:
            raise ValueError(f"unknown reverse_variance {self.reverse_variance!r}; "
                             f"allowed: {', '.join(REVERSE_VARIANCES)}")
        if (self.reverse_variance == "learned") != (self.loss == "hybrid"):
            raise ValueError(f"reverse_variance={self.reverse_variance!r} with loss={self.loss!r}: a learned "
                             f"variance is trained only by L_vlb; allowed: reverse_variance 'learned' together "
                             f"with loss 'hybrid' (iDDPM), or 'beta' / 'beta_tilde' with 'simple' / 'elbo'")

    @property
    def schedule_config(self) -> ScheduleConfig:
        return ScheduleConfig(name=self.schedule, T=self.T, beta_start=self.beta_start, beta_end=self.beta_end)

    def model_config(self, model: UNetConfig) -> UNetConfig:
        """The U-Net config this diffusion needs: a variance output exactly when the variance is learned."""
        return dataclasses.replace(model, learn_sigma=self.reverse_variance == "learned")




@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 25                 # thesis: 25 (3,000 updates each at batch 16)
    batch_size: int = 16             # global batch; each of N DDP ranks takes batch_size / N
    lr: float = 2e-4                 # Adam, constant (thesis Table 1)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    ema_decay: float = 0.9999        # thesis: 0.9999
    ema_warmup: bool = False         # decay min(ema_decay, (1+k)/(10+k)) at update k (diffusers); thesis: off
    seed: int = 0                    # initialisation, data order, training noise
    max_steps: int | None = None     # stop after this many optimizer steps (tests, short runs)
    grad_clip: float | None = None   # None = no clipping (thesis)
    log_every_first: int = 1000      # log every step's loss for the first N steps (Fig. 26b) ...
    log_every: int = 100             # ... then every N steps
    # Fig. 26b's second curve: at each logged step among the first N, the loss of one validation
    # minibatch (batch_size images in the split's fixed order, fresh t and eps of the evaluation
    # seed, raw weights before the step's update, eval mode) beside that step's training loss.
    # One extra forward per such step; no training RNG is consumed. 0: not recorded.
    val_loss_first: int = 0
    eval_every: int = 2000           # call hooks.on_eval every N steps ...
    eval_start: int = 8000           # ... from this step on (and always at the last step)
    # The epoch-end evaluation-mode losses (EpochLosses): validation loss of the EMA and raw weights
    # (fixed t/eps) and the raw weights' loss on a fixed training batch. None: at every epoch end; N:
    # only at the epoch ends that pass a multiple of N steps (and the last step) -- a 1,000-image set
    # has 1,210 epochs in 75,000 steps, and 1,210 passes over a 12,000-image validation split would
    # outweigh the training. N = eval_every: about once per evaluation.
    val_every: int | None = None
    train_eval_images: int = 512     # size of that fixed training batch (capped at the training set)
    # Fast path (see BENCHMARKS.md); the defaults are the plain fp32 thesis loop.
    precision: Precision = "fp32"    # bf16: autocast of the forward pass; loss and Adam in fp32
    channels_last: bool = False      # NHWC memory layout for convolutions
    compile: bool = False            # torch.compile the training forward ...
    compile_mode: CompileMode = "default"   # ... reduce-overhead / max-autotune: with compile's own CUDA graphs
    fused_adam: bool | None = None   # None: fused Adam on CUDA, the reference loop elsewhere
    # No host in the loop (issue 11). device_noise draws (t, eps) from a seeded generator on the
    # training device: on a GPU that is another random stream than the default CPU one (same on a CPU).
    device_noise: bool = False
    deferred_sync: bool = False      # fetch logged losses every log_every steps (and at epoch/eval/end), not each
    # Replay forward+backward+Adam as one CUDA graph (graph_step.py; CUDA only). With compile (modes
    # default / max-autotune-no-cudagraphs) the graph replays inductor's fused kernels: fewer, larger launches.
    cuda_graph: bool = False
    label_dropout: float = 0.1       # class-conditional models: P(label -> null label), classifier-free guidance

    def __post_init__(self):
        for name in ("epochs", "batch_size", "log_every", "eval_every", "train_eval_images"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name}={v!r} must be an integer >= 1")
        if not isinstance(self.val_loss_first, int) or self.val_loss_first < 0:
            raise ValueError(f"TrainConfig.val_loss_first={self.val_loss_first!r} must be an integer >= 0")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ValueError(f"TrainConfig.lr={self.lr!r} must be a positive number")
        object.__setattr__(self, "adam_betas", tuple(self.adam_betas))
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"TrainConfig.compile_mode={self.compile_mode!r}; allowed: {', '.join(COMPILE_MODES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision={self.precision!r}; allowed: {', '.join(PRECISIONS)}")
        if self.cuda_graph and self.compile and self.compile_mode in GRAPHING_COMPILE_MODES:
            raise ValueError(f"TrainConfig.cuda_graph=True with compile_mode={self.compile_mode!r}: that mode replays "
                             f"compile's own CUDA graphs, which cannot be captured again; allowed with cuda_graph: "
                             f"compile_mode=default or max-autotune-no-cudagraphs (or cuda_graph=False)")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"TrainConfig.label_dropout={self.label_dropout!r} must lie in [0, 1)")


# ------------------------------------------------------------------------------ evaluation
Sampler = Literal["ddpm", "ddim"]                 # samplers.py
SAMPLERS = get_args(Sampler)
INTERVAL_METRICS = ("fid", "inception_score", "precision", "recall")   # metrics/intervals.py
INTERVAL_KEYS = tuple(f"{m}_{end}" for m in INTERVAL_METRICS for end in ("lo", "hi"))
# The keys of evaluate_samples that the `evals` table records (every call returns all of
# them; the conditional two are NaN for samples without class labels).
METRIC_KEYS = ("fid", "fid_mean_term", "fid_cov_term", "inception_score", "inception_score_std", "h_y",
               "h_y_given_x", "precision", "recall", "memorized_fraction", "conditional_accuracy", "fid_class_mean",
               *INTERVAL_KEYS)
# The same metrics of real data: n_samples held-out images (the MNIST test set, drawn with the
# evaluation seed) in place of the samples. What a perfect generator would score at this sample
# count -- the floor (FID) or ceiling (IS, precision, recall) every curve should be read against --
# with the same intervals as the samples' metrics, and the real point of the entropy plane.
REAL_METRICS = ("fid", "inception_score", "precision", "recall", "memorized_fraction", "h_y", "h_y_given_x",
                *INTERVAL_KEYS)
REAL_DATA_KEYS = (*(f"real_{k}" for k in REAL_METRICS), "real_n_samples")


@dataclass(frozen=True)
class EvalConfig:
    n_samples: int = 1000            # samples drawn for the metrics (the first grid_images form the grid)
    grid_images: int = 64            # images in the saved sample grid (Fig. 28)
    sampler: Sampler = "ddpm"        # ddpm (thesis)
    steps: int | None = None         # DDIM steps (None: 50)
    eta: float = 0.0                 # DDIM eta
    clip_x0: float | None = None     # clip each step's x0 estimate to [-c, c] (None: the thesis's unclipped update)
    is_splits: int = 5               # IS averaged over this many splits (thesis: 5)
    interval_halves: int = 50        # random halves of the samples for the 95% intervals of FID, IS,
                                     # precision, recall (metrics/intervals.py; 0: no interval columns)
    t_grid: int | tuple[int, ...] = 40   # number of residual timesteps covering 1..T, or explicit t's
    residual_images: int = 256       # fixed validation images for Residual(t)
    seed: int = 0                    # the study's evaluation seed
    metrics: bool = True             # compute the metrics record (needs diffusion_core.metrics)
    batch_size: int = 256            # sampling / residual batch
    # Sampling fast path (the residuals stay fp32 eager: they are the measurement).
    precision: Precision = "fp32"    # bf16: autocast of the network inside the sampler
    compile: bool = False            # torch.compile the network for sampling (CUDA graphs on a GPU)
    guidance_scale: float = 1.0      # classifier-free guidance s (class-conditional models): 0 uncond., 1 cond.
    progressive_t: tuple[int, ...] = ()  # progressive-generation frames (t values; 0 = the sample), last eval
    progressive_rows: int = 8        # samples shown in the progressive-generation figure
    keep_samples: bool = False       # save all n_samples samples of every evaluation (uint8 .npy, records.layout
                                     # .eval_samples_file): `studyctl generalization` reads them, not sampling again

    def __post_init__(self):
        if self.guidance_scale < 0:
            raise ValueError(f"EvalConfig.guidance_scale={self.guidance_scale!r} must be >= 0")
        if self.precision not in PRECISIONS:
            raise ValueError(f"EvalConfig.precision={self.precision!r}; allowed: {', '.join(PRECISIONS)}")
        if self.clip_x0 is not None and not self.clip_x0 > 0:
            raise ValueError(f"EvalConfig.clip_x0={self.clip_x0!r} must be > 0 or None")
        if not isinstance(self.interval_halves, int) or self.interval_halves < 0:
            raise ValueError(f"EvalConfig.interval_halves={self.interval_halves!r} must be an integer >= 0 "
                             f"(0: no intervals)")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"EvalConfig.batch_size={self.batch_size!r} must be an integer >= 1")
