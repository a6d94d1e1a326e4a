"""The study-file schema: a validated `StudySpec` (study_file.py reads the YAML; plan.py expands it).

A study file has the sections below (every key optional except `name`; defaults are the
thesis's Table 1). The five config sections ARE the diffusion_core dataclasses: their keys
are the dataclass fields, their defaults the dataclass defaults (one declaration, so YAML and
core cannot disagree). Unknown keys are errors, not silently ignored: a typo in a sweep must
not run 30 trials of the wrong thing.

    name: quickstart
    output: runs/quickstart          # default runs/<name> (relative to the working dir)
    ray_address: null                # null: start a local Ray sized to the machine
    data:       diffusion_core.config.DataConfig      {dataset, root, subset_size, subset_index, ...}
    model:      diffusion_core.config.UNetConfig      {base_width, channel_mult, blocks_per_level, ...}
    diffusion:  diffusion_core.config.DiffusionConfig {T, schedule, beta_start, beta_end, reverse_variance, loss}
    training:   diffusion_core.config.TrainConfig     {epochs, batch_size, lr, ..., eval_every, eval_start, ...}
    evaluation: diffusion_core.config.EvalConfig      {n_samples, sampler, steps, is_splits, t_grid, seed, ...}
    sweep:      {grid: {dotted.field: [values]}, arms: [{...}], seeds: [..], random: {..}, num_samples, asha}
    resources:  {workers_per_trial, cpus_per_worker, gpus_per_worker, max_concurrent_trials, max_failures, stack, ...}
    tracking:   {enabled, uri, experiment}
    analysis:   {figures, figure_formats, decompose, decompose_points, generalization}

model.in_channels, model.image_size and model.learn_sigma are not written in the file: each
trial sets them from data.dataset, data.image_size and diffusion.reverse_variance (DERIVED).
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import pydantic.dataclasses
from pydantic import (BaseModel, ConfigDict, Field, NonNegativeFloat, PlainValidator, PositiveFloat, Strict,
                      ValidationError, field_validator)

from diffusion_core.config import DataConfig, DiffusionConfig, EvalConfig, TrainConfig, UNetConfig

# Integers and booleans are strict (YAML `width: "8"` or `attention: 1` is a mistake worth
# reporting); floats are lax because PyYAML reads `2e-4` (no dot) as a string.
StrictInt = Annotated[int, Strict()]
PositiveInt = Annotated[int, Strict(), Field(gt=0)]
NonNegativeInt = Annotated[int, Strict(), Field(ge=0)]
StrictBool = Annotated[bool, Strict()]
UnitInterval = Annotated[float, Field(ge=0.0, lt=1.0)]   # [0, 1): Adam's betas, dropout, EMA decay
OpenUnitInterval = Annotated[float, Field(gt=0.0, lt=1.0)]


def _timestep_grid(value):
    """evaluation.t_grid: a count of timesteps or a non-empty list of them (one message for both
    forms, where a Union would report each form's failure under pydantic's internal type names).
    The ranges depend on diffusion.T, possibly swept: plan.py checks them per trial."""
    if type(value) is int:
        return value
    if isinstance(value, (list, tuple)) and value and all(type(t) is int for t in value):
        return tuple(value)
    raise ValueError(f"bad value {value!r}: allowed: a count n in 2..diffusion.T (n residual timesteps spread "
                     f"over 1..T) or a list of distinct timesteps in 1..diffusion.T")


TimestepGrid = Annotated[Union[int, tuple[int, ...]], PlainValidator(_timestep_grid)]


class StudyError(ValueError):
    """A study file is wrong; the message names the field, the value and what is allowed."""


# ---------------------------------------------------------------------- the config sections
SECTION_CLASSES: dict[str, type] = {"data": DataConfig, "model": UNetConfig, "diffusion": DiffusionConfig,
                                    "training": TrainConfig, "evaluation": EvalConfig}
SECTIONS = tuple(SECTION_CLASSES)

# What a study file adds to the dataclasses' own types: bounds, so that a bad value is named
# with its allowed range before any trial starts. The type of the non-null value; a field that
# the dataclass declares `X | None` stays nullable. Fields not listed keep the dataclass type.
BOUNDS: dict[type, dict[str, Any]] = {
    DataConfig: {"subset_size": PositiveInt, "subset_index": NonNegativeInt, "image_size": PositiveInt,
                 "val_size": PositiveInt, "molrg_rank": PositiveInt, "molrg_floor": PositiveFloat,
                 "molrg_components": PositiveInt},
    UNetConfig: {"in_channels": PositiveInt, "image_size": PositiveInt, "base_width": PositiveInt,
                 "channel_mult": Annotated[tuple[PositiveInt, ...], Field(min_length=1)],
                 "blocks_per_level": PositiveInt, "bottleneck_blocks": NonNegativeInt, "dropout": UnitInterval,
                 "attention_heads": PositiveInt, "norm_groups": PositiveInt, "final_norm_groups": PositiveInt,
                 "num_classes": PositiveInt},
    DiffusionConfig: {"T": Annotated[int, Strict(), Field(ge=2)], "beta_start": OpenUnitInterval,
                      "beta_end": OpenUnitInterval},
    TrainConfig: {"epochs": PositiveInt, "batch_size": PositiveInt, "lr": PositiveFloat,
                  "adam_betas": tuple[UnitInterval, UnitInterval], "adam_eps": PositiveFloat,
                  "ema_decay": UnitInterval, "max_steps": PositiveInt, "grad_clip": PositiveFloat,
                  "log_every_first": NonNegativeInt, "log_every": PositiveInt, "val_loss_first": NonNegativeInt, "eval_every": PositiveInt,
                  "eval_start": NonNegativeInt, "val_every": PositiveInt, "train_eval_images": PositiveInt,
                  "label_dropout": UnitInterval},
    EvalConfig: {"n_samples": PositiveInt, "grid_images": PositiveInt, "steps": PositiveInt, "eta": NonNegativeFloat,
                 "clip_x0": PositiveFloat,
                 "is_splits": PositiveInt, "interval_halves": NonNegativeInt, "t_grid": TimestepGrid,
                 "residual_images": PositiveInt, "batch_size": PositiveInt, "guidance_scale": NonNegativeFloat,
                 "progressive_t": tuple[NonNegativeInt, ...], "progressive_rows": PositiveInt},
}

# Fields a trial sets from other sections (plan.resolve_model); a study file may not give them.
DERIVED = {"model.in_channels": "data.dataset (1 channel for mnist, 3 for cifar10)",
           "model.image_size": "data.image_size (null: the dataset's native size)",
           "model.learn_sigma": "diffusion.reverse_variance (learned: true)"}

# Keys of older study files, and where they live now (named in the unknown-key error).
MOVED = {"evaluation.every": "training.eval_every", "evaluation.start": "training.eval_start",
         "evaluation.val_every": "training.val_every", "evaluation.keep_checkpoints": "resources.keep_checkpoints",
         "training.val_every_epoch": "training.val_every (e.g. equal to training.eval_every)"}


def _strict(hint):
    """The study-file type of a dataclass annotation: ints and bools strict, recursively."""
    if hint is bool:
        return StrictBool
    if hint is int:
        return StrictInt
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return Union[tuple(_strict(a) for a in args)]
    if origin is tuple:
        return tuple[tuple(a if a is Ellipsis else _strict(a) for a in args)]
    return hint


def _section(core: type) -> type:
    """A pydantic dataclass that IS `core` (a subclass: same fields, same defaults, core's own
    __post_init__ checks) with strict ints/bools, BOUNDS and unknown keys rejected."""
    hints = typing.get_type_hints(core)
    names = [f.name for f in dataclasses.fields(core)]
    unknown = set(BOUNDS[core]) - set(names)
    if unknown:  # a bound for a field the dataclass does not have: a rename left it behind
        raise TypeError(f"BOUNDS[{core.__name__}] names unknown fields {sorted(unknown)}")
    annotations = {}
    for name in names:
        bound = BOUNDS[core].get(name)
        nullable = type(None) in typing.get_args(hints[name])
        annotations[name] = _strict(hints[name]) if bound is None else (Optional[bound] if nullable else bound)
    name = core.__name__ + "Section"
    ns = {"__annotations__": annotations, "__module__": __name__, "__qualname__": name,
          "__doc__": f"{core.__name__}, validated from a study file.",
          **{f.name: dataclasses.field(default=f.default) if f.default is not dataclasses.MISSING
             else dataclasses.field(default_factory=f.default_factory) for f in dataclasses.fields(core)}}
    return pydantic.dataclasses.dataclass(type(name, (core,), ns), frozen=True, config=ConfigDict(extra="forbid"))


# Module-level names, so that pickled sections (Ray, worker processes) find their class.
DataConfigSection = _section(DataConfig)
UNetConfigSection = _section(UNetConfig)
DiffusionConfigSection = _section(DiffusionConfig)
TrainConfigSection = _section(TrainConfig)
EvalConfigSection = _section(EvalConfig)
SECTION_TYPES: dict[str, type] = {"data": DataConfigSection, "model": UNetConfigSection,
                                  "diffusion": DiffusionConfigSection, "training": TrainConfigSection,
                                  "evaluation": EvalConfigSection}


def section_dict(section: str, cfg) -> dict:
    """A section's values as a study file writes them (lists, not tuples; DERIVED fields left out)."""
    out = {}
    for f in dataclasses.fields(cfg):
        if f"{section}.{f.name}" in DERIVED:
            continue
        v = getattr(cfg, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


# --------------------------------------------------------------- the study-level sections
class _Strict(BaseModel):
    # extra="forbid": an unknown (misspelt) key is an error naming the key.
    model_config = ConfigDict(extra="forbid")


class AshaSpec(_Strict):
    metric: Literal["val_loss", "train_loss", "fid", "inception_score"] = "val_loss"
    mode: Literal["min", "max"] = "min"
    grace_period: PositiveInt = 1             # evaluations before a trial may be stopped
    reduction_factor: float = Field(2.0, gt=1.0)
    max_t: PositiveInt = 100                  # evaluations


class SweepSpec(_Strict):
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    arms: list[dict[str, list[Any]]] = Field(default_factory=list)
    seeds: Optional[list[StrictInt]] = None
    random: dict[str, list[Any]] = Field(default_factory=dict)
    num_samples: PositiveInt = 1
    random_seed: StrictInt = 0
    asha: Optional[AshaSpec] = None


class ResourcesSpec(_Strict):
    workers_per_trial: PositiveInt = 1        # DDP workers (gloo on CPU, NCCL on GPU)
    cpus_per_worker: PositiveFloat = 1.0
    gpus_per_worker: NonNegativeFloat = 0.0   # fractional: several small trials share a GPU
    max_concurrent_trials: Optional[PositiveInt] = None  # null: as many as the cluster fits (--local: 1)
    max_failures: NonNegativeInt = 2          # worker-group restarts from the last checkpoint
    keep_checkpoints: Optional[PositiveInt] = 3    # full resume states kept per trial (EMA snapshots: all)
    # How a trial's workers are placed: PACK (fewest nodes), SPREAD (across nodes), STRICT_*.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Up to this many trials that can share a stacked model (same architecture, batch size, ...:
    # orchestrator/stacking.py) train together in one process (--local) or one Ray Train worker
    # (ray_stacked.py); 1: one trial per process.
    stack: PositiveInt = 1


class TrackingSpec(_Strict):
    enabled: StrictBool = True                # false: Parquet records only (no MLflow; `--no-tracking`)
    uri: Optional[str] = None                 # null: sqlite:///<output>/mlflow.db
    experiment: Optional[str] = None          # null: the study name


class AnalysisSpec(_Strict):
    figures: StrictBool = True                # `studyctl figures` after the sweep
    decompose: StrictBool = False             # `studyctl decompose` after the sweep (needs sweep.seeds)
    decompose_points: PositiveInt = 256       # fixed validation points per timestep
    generalization: StrictBool = False        # `studyctl generalization` after the sweep (needs data.subset_index pairs)
    # The files each figure is saved as: PNG always (the report shows it), PDF and SVG (vector, for a
    # paper) on request. PDF costs ~0.2 s a figure on a CPU (a study draws 20-40 figures).
    figure_formats: list[Literal["png", "pdf", "svg"]] = ["png", "pdf"]

    @field_validator("figure_formats")
    @classmethod
    def _png_once(cls, v: list[str]) -> list[str]:
        if "png" not in v or len(set(v)) != len(v):
            raise ValueError(f"bad value {v}: the report shows the PNG of each figure; allowed: a list of distinct "
                             f"formats from png, pdf, svg that includes png (e.g. [png] or [png, pdf])")
        return v


class StudySpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    description: str = ""
    output: Optional[str] = None
    ray_address: Optional[str] = None
    data: DataConfigSection = Field(default_factory=DataConfigSection)
    model: UNetConfigSection = Field(default_factory=UNetConfigSection)
    diffusion: DiffusionConfigSection = Field(default_factory=DiffusionConfigSection)
    training: TrainConfigSection = Field(default_factory=TrainConfigSection)
    evaluation: EvalConfigSection = Field(default_factory=EvalConfigSection)
    sweep: Optional[SweepSpec] = None
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    analysis: AnalysisSpec = Field(default_factory=AnalysisSpec)

    def output_dir(self, override: str | os.PathLike | None = None) -> Path:
        return Path(override or self.output or Path("runs") / self.name).expanduser().resolve()

    def sections(self) -> dict[str, dict]:
        """The five config sections as a study file writes them."""
        return {s: section_dict(s, getattr(self, s)) for s in SECTIONS}

    def to_file(self) -> dict:
        """The whole study as a study file (parse_study(spec.to_file()) gives it back)."""
        dumped = self.model_dump(mode="json", exclude=set(SECTIONS))
        return {k: section_dict(k, getattr(self, k)) if k in SECTION_CLASSES else dumped[k]
                for k in type(self).model_fields}


# --------------------------------------------------------------------------- validation
def _fields_of(tp) -> dict[str, Any] | None:
    """{field: annotation} of a section type (a pydantic model or a dataclass), else None."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return {k: f.annotation for k, f in tp.model_fields.items()}
    if dataclasses.is_dataclass(tp):
        return {f.name: f.type for f in dataclasses.fields(tp)}
    return None


def _section_type(model: type, loc: tuple) -> type | None:
    """The section type that `loc` leads to from `model` (None past a non-section)."""
    for part in loc:
        ann = (_fields_of(model) or {}).get(part) if isinstance(part, str) else None
        ann = next((a for a in typing.get_args(ann) if _fields_of(a) is not None), ann)
        if _fields_of(ann) is None:
            return None
        model = ann
    return model


def _allowed_keys(model: type, loc: tuple, prefix: str = "") -> list[str] | None:
    """The keys allowed beside loc[-1]: the fields of the section (model) that loc[:-1] leads to."""
    model = _section_type(model, loc[:-1])
    if model is None:
        return None
    section = (prefix + ".".join(str(p) for p in loc[:-1])).rstrip(".")
    return [k for k in _fields_of(model) if f"{section}.{k}" not in DERIVED]


def _format_errors(err: ValidationError, prefix: str = "", model: type | None = None) -> str:
    lines = []
    for e in err.errors():
        loc = prefix + ".".join(str(x) for x in e["loc"])
        if e["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            allowed = _allowed_keys(model or StudySpec, e["loc"], prefix)
            moved = f"; it is now {MOVED[loc]}" if loc in MOVED else ""
            lines.append(f"field '{loc}': unknown key (check the spelling{moved}); allowed keys here: "
                         f"{', '.join(allowed) if allowed else 'see orchestrator/spec.py'}")
        elif e["type"] == "missing":
            lines.append(f"field '{loc}': required but missing")
        elif e["type"] == "value_error":  # a dataclass's own __post_init__ check: its message names the field
            msg = str(e["ctx"]["error"])
            named = re.match(r"^(?:\w+Config\.)?(\w+)=", msg)
            if named and named.group(1) in (_fields_of(_section_type(model or StudySpec, e["loc"])) or {}):
                loc = f"{loc}.{named.group(1)}"
            lines.append(f"field '{loc}': {msg}")
        else:
            lines.append(f"field '{loc}': bad value {e.get('input')!r}: {e['msg']}")
    return "\n".join(lines)


def _derived_given(raw: dict) -> str | None:
    """The error for a DERIVED field written in the file (None if there is none)."""
    for key, source in DERIVED.items():
        section, field = key.split(".")
        if isinstance(raw.get(section), dict) and field in raw[section]:
            return f"field '{key}': set for each trial from {source}; remove it from the study file"
    return None


def parse_study(raw: Any, source: str = "<study>") -> StudySpec:
    if not isinstance(raw, dict):
        raise StudyError(f"{source}: the study file must be a YAML mapping (name: ..., data: ..., ...), "
                         f"got {type(raw).__name__}")
    derived = _derived_given(raw)
    if derived:
        raise StudyError(f"{source}: invalid study file\n{derived}")
    try:
        spec = StudySpec.model_validate(raw)
    except ValidationError as e:
        raise StudyError(f"{source}: invalid study file\n{_format_errors(e)}") from None
    check_study(spec, source)
    return spec


def check_study(spec: StudySpec, source: str = "<study>") -> None:
    """Whole-study checks: the data root and the resources (plan.build_plan checks every trial)."""
    from diffusion_core.config import resolve_data_root

    root = resolve_data_root(spec.data.root)
    if spec.data.dataset == "mnist" or (spec.data.dataset == "molrg" and spec.data.molrg_basis == "mnist"):
        needed = root / "MNIST" / "raw"       # molrg with basis mnist is fitted to MNIST
    elif spec.data.dataset == "cifar10":
        needed = root / "cifar-10-batches-py"
    else:
        needed = None                         # molrg with random bases: drawn, nothing to read
    if needed is not None and not needed.exists():
        raise StudyError(f"{source}: field 'data.root': bad value {spec.data.root!r} (resolved to {root}): "
                         f"{needed} does not exist. Set data.root to the folder that contains "
                         f"{needed.relative_to(root)}, or export STUDYCTL_DATA_ROOT.")
    if spec.resources.gpus_per_worker > 1 and spec.resources.gpus_per_worker != int(spec.resources.gpus_per_worker):
        raise StudyError(f"{source}: field 'resources.gpus_per_worker': bad value "
                         f"{spec.resources.gpus_per_worker}: above 1 it must be a whole number")
    r = spec.resources
    if 0 < r.gpus_per_worker < 1 and r.workers_per_trial > 1:
        # Ray packs fractional GPUs onto one device, and NCCL refuses two ranks on one GPU.
        raise StudyError(f"{source}: field 'resources.gpus_per_worker': bad value {r.gpus_per_worker}: a trial "
                         f"with {r.workers_per_trial} DDP workers needs a whole GPU per worker (NCCL cannot put "
                         f"two ranks on one GPU); allowed: gpus_per_worker >= 1, or workers_per_trial: 1 to let "
                         f"small trials share a GPU")
    if r.stack > 1 and spec.sweep is not None and spec.sweep.asha is not None:
        # ASHA stops a trial alone; a stacked group's members train in one Ray trial, so stopping
        # one would need the group to drop a member on the scheduler's word: not supported.
        raise StudyError(f"{source}: field 'resources.stack': bad value {r.stack}: sweep.asha stops trials one "
                         f"by one, but a stacked group trains its members in one Ray trial; allowed: "
                         f"resources.stack: 1 with sweep.asha, or remove sweep.asha to stack")
