"""What each training path honours: every field of the core configs, and the values a path refuses.

The training engine runs a trial on one of three paths:

    alone    train() in one process (a notebook, `studyctl launch --local`, a Ray trial with one worker)
    ddp      train() under torch.distributed, world size > 1 (a Ray trial with resources.workers_per_trial > 1)
    stacked  a member of a train_stacked group (resources.stack > 1)

`SUPPORT` has an entry for every field of UNetConfig, DiffusionConfig, TrainConfig and EvalConfig
(DataConfig's fields are honoured by every path: the data is loaded before any path runs, so they
get their entry automatically). An entry maps the paths that refuse some values of the field to a
`Refusal`: which values, what is allowed there, and why. A path not named honours every value. A
field added to a config without an entry here fails tests/test_capabilities.py: no field can be
silently ignored by a path nobody looked at.

Each path checks its refusals before any work (`check_path`): train() for alone/ddp,
stacked.check_stackable for a group's members; orchestrator/capabilities.py maps the execution
paths of a study (local, Ray, Ray DDP, stacked group) to these and `build_plan` refuses a trial
whose path cannot honour it. Device needs (cuda_graph wants a CUDA device) are checked where the
device is known, in train() and train_stacked.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from .config import DataConfig, DiffusionConfig, EvalConfig, TrainConfig, UNetConfig

if TYPE_CHECKING:
    import torch

    from .training.engine import TrainHooks

ENGINE_PATHS = ("alone", "ddp", "stacked")
_PHRASE = {"alone": "in a run alone", "ddp": "under DDP (world size > 1)", "stacked": "when stacking"}


@dataclass(frozen=True)
class Refusal:
    refuses: Callable[[Any], bool]   # of a trial's configs (anything with .data/.model/.diffusion/.training)
    allowed: str                     # what the path accepts instead
    why: str


def _true(section: str, name: str) -> Callable[[Any], bool]:
    return lambda c: bool(getattr(getattr(c, section), name))


_NOT_STACKED_FORWARD = "the stacked forward (stacked_grouped.py / vmap) does not implement it"

# {section: {field: {path: Refusal}}}; {} = honoured by every path.
SUPPORT: dict[str, dict[str, dict[str, Refusal]]] = {
    "model": {
        "in_channels": {}, "image_size": {}, "base_width": {}, "channel_mult": {}, "blocks_per_level": {},
        "bottleneck_blocks": {}, "dropout": {},
        "attention": {},             # stacked: the vmap forward (the grouped one has no attention)
        "attention_heads": {}, "norm_groups": {}, "final_norm_groups": {},
        "learn_sigma": {"stacked": Refusal(_true("model", "learn_sigma"), "False (the learned variance)",
                                           _NOT_STACKED_FORWARD)},
        "class_conditional": {"stacked": Refusal(_true("model", "class_conditional"), "False",
                                                 _NOT_STACKED_FORWARD)},
        "num_classes": {},           # read only by class-conditional models
    },
    "diffusion": {
        "T": {}, "schedule": {}, "beta_start": {}, "beta_end": {}, "reverse_variance": {},
        "loss": {"stacked": Refusal(lambda c: c.diffusion.loss == "hybrid", "'simple' or 'elbo'",
                                    "L_vlb of a learned variance: " + _NOT_STACKED_FORWARD)},
    },
    "training": {
        "epochs": {}, "batch_size": {}, "lr": {}, "adam_betas": {}, "adam_eps": {}, "ema_decay": {},
        "ema_warmup": {}, "seed": {}, "max_steps": {}, "grad_clip": {}, "log_every_first": {}, "log_every": {},
        "eval_every": {}, "eval_start": {}, "val_every": {}, "train_eval_images": {},
        "precision": {"stacked": Refusal(lambda c: c.training.precision != "fp32", "'fp32'",
                                         "the stacked step has no autocast")},
        "channels_last": {"stacked": Refusal(_true("training", "channels_last"), "False",
                                             "the group's layout is train_stacked(channels_last=...)")},
        "compile": {"stacked": Refusal(_true("training", "compile"), "False",
                                       "the stacked step is not compiled")},
        "compile_mode": {},          # read only with compile (refused where compile is; `validate` notes it unused)
        "fused_adam": {"stacked": Refusal(lambda c: c.training.fused_adam is True, "None or False",
                                          "a group's Adam is stacked_optim.FlatAdam, whole-tensor ops, not "
                                          "torch's fused kernel")},
        "device_noise": {},
        "deferred_sync": {},
        "cuda_graph": {"ddp": Refusal(_true("training", "cuda_graph"), "False",
                                      "one CUDA graph replays one process's step; DDP all-reduces inside it")},
        "label_dropout": {},         # read only by class-conditional models (refused where they are; noted unused)
        "val_loss_first": {path: Refusal(lambda c: c.training.val_loss_first > 0 and c.diffusion.loss != "simple",
                                         "0, or diffusion.loss 'simple'",
                                         "the validation minibatch loss is L_simple: beside an ELBO or hybrid "
                                         "training loss it would compare two objectives")
                           for path in ENGINE_PATHS},
    },
    # The evaluation runs in the trial's hooks, the same Evaluator on every path.
    "evaluation": {
        "n_samples": {}, "grid_images": {}, "sampler": {}, "steps": {}, "eta": {}, "clip_x0": {}, "is_splits": {},
        "interval_halves": {},
        "t_grid": {}, "residual_images": {}, "seed": {}, "metrics": {}, "batch_size": {}, "precision": {},
        "compile": {}, "guidance_scale": {}, "progressive_t": {}, "progressive_rows": {}, "keep_samples": {},
    },
}
SUPPORT["data"] = {f.name: {} for f in dataclasses.fields(DataConfig)}


def refusals(path: str, configs: Any) -> list[tuple[str, str]]:
    """(dotted field, message) for each field whose value `path` cannot honour in these configs."""
    if path not in ENGINE_PATHS:
        raise ValueError(f"unknown training path {path!r}; allowed: {', '.join(ENGINE_PATHS)}")
    out = []
    for section, fields in SUPPORT.items():
        cfg = getattr(configs, section, None)
        if cfg is None:
            continue
        for name, by_path in fields.items():
            refusal = by_path.get(path)
            if refusal is not None and refusal.refuses(configs):
                out.append((f"{section}.{name}", f"{section}.{name}={getattr(cfg, name)!r} is not supported "
                                                 f"{_PHRASE[path]} ({refusal.why}); allowed: {refusal.allowed}"))
    return out


def check_path(path: str, configs: Any, who: str = "") -> None:
    """Raise ValueError naming every field `path` cannot honour (who: a prefix, e.g. the member)."""
    found = refusals(path, configs)
    if found:
        raise ValueError(who + "; ".join(message for _, message in found))


# ------------------------------------------------------------------------------ stacking
# Which trials may share a stacked group (train_stacked, stacked.py): here, beside the refusals it
# applies, so that a study's plan is checked without torch.
@dataclass
class Member:
    training: TrainConfig
    model: UNetConfig = field(default_factory=UNetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    hooks: TrainHooks | None = None
    splits: object | None = None        # pre-loaded data.Splits (else loaded from `data`)
    resume_state: dict | None = None    # a TrainState/MemberState.state_dict()
    name: str = ""
    # The member's evaluation config: its Evaluator (ctx.evaluator, as train(evaluation=...) builds it);
    # members evaluating at one step then draw their samples in one batched pass (stacked_sampling.py),
    # handed to on_eval as ctx.eval_samples. None: no evaluator, hooks sample alone.
    evaluation: EvalConfig | None = None


def stack_key(model: UNetConfig, training: TrainConfig) -> tuple:
    """Members with equal keys can share a group."""
    return repr(model), training.batch_size


def check_stackable(members: list[Member]) -> None:
    if not members:
        raise ValueError("train_stacked needs at least one member")
    key = stack_key(members[0].model, members[0].training)
    for i, m in enumerate(members):
        if stack_key(m.model, m.training) != key:
            raise ValueError(f"member {i} ({m.name!r}): model and training.batch_size must equal member 0's "
                             f"to stack ({m.model} / {m.training.batch_size} vs {members[0].model} / "
                             f"{members[0].training.batch_size})")
        check_path("stacked", m, who=f"member {i} ({m.name!r}): ")  # capabilities.SUPPORT, e.g. no compile
        if m.training.cuda_graph != members[0].training.cuda_graph:  # one step function for the whole group
            raise ValueError(f"member {i} ({m.name!r}): training.cuda_graph={m.training.cuda_graph!r} must equal "
                             f"member 0's ({members[0].training.cuda_graph!r}) to stack")


def check_graphable(members: list[Member], device: "torch.device", backend: str, capture: bool = True) -> None:
    """train_stacked(cuda_graph=True)'s refusals, before any work (stacked.py)."""
    if capture and device.type != "cuda":
        raise ValueError(f"train_stacked(cuda_graph=True) needs a CUDA device (got {device}); "
                         f"allowed on this device: cuda_graph=False")
    for i, m in enumerate(members):
        if m.diffusion.loss != "simple":  # its per-example weights are looked up on the host
            raise ValueError(f"member {i} ({m.name!r}): diffusion.loss={m.diffusion.loss!r} with "
                             f"train_stacked(cuda_graph=True); allowed: 'simple'")
    if backend == "vmap" or (backend == "auto" and members[0].model.attention):
        # vmap's functional_call + fed masks are not verified under capture; grouped is the faster path
        raise ValueError(f"train_stacked(cuda_graph=True) needs backend='grouped' (got backend={backend!r}"
                         f"{', model.attention=True selects vmap' if backend == 'auto' else ''}); "
                         f"allowed: 'grouped', 'auto' without attention")
