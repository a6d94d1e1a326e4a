"""A study's plan: its sweep expanded, once per command, into typed trials.

    StudySpec (spec.py) --build_plan--> Plan(trials=[Trial(trial_id, overrides, data, model,
                                                           diffusion, training, evaluation)])

Each Trial holds the five diffusion_core configs it trains with, validated and resolved
(model.in_channels / image_size / learn_sigma set from the data and diffusion), so a
driver or worker reads `trial.diffusion.reverse_variance`, never a nested dict. The plan
is built once by the command (`validate`, `launch`, `resume`) and handed to every trial
driver as is (Ray: tune.with_parameters; --local: the process pool's pickle).

Sweep semantics: the trials are every point of `grid`, plus every point of each arm in
`arms` (an arm overrides the base config, not the grid), each crossed with `seeds`
(-> training.seed) and, when `random` is given, with `num_samples` seeded random draws of
its choices. Any field of data/model/diffusion/training/evaluation can be swept by its
dotted name, epochs included. Trial ids are deterministic (resume relies on it).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import random
import types
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError

from diffusion_core.capabilities import refusals
from diffusion_core.config import (IMAGE_CHANNELS, NATIVE_IMAGE_SIZE, SPLIT_SIZES, DataConfig, DiffusionConfig,
                                   EvalConfig, TrainConfig, UNetConfig)

from records.parquet import param_types
from .spec import DERIVED, SECTION_CLASSES, SECTION_TYPES, SECTIONS, StudyError, StudySpec, SweepSpec, _format_errors

_ADAPTERS = {s: TypeAdapter(t) for s, t in SECTION_TYPES.items()}


@dataclass(frozen=True)
class Trial:
    """One trial: its id, the sweep values that made it, and the configs it trains with."""
    trial_id: str
    overrides: dict[str, Any]       # {dotted field: value} of its sweep point ({} for the base)
    data: DataConfig
    model: UNetConfig               # resolved: in_channels, image_size, learn_sigma (spec.DERIVED)
    diffusion: DiffusionConfig
    training: TrainConfig
    evaluation: EvalConfig

    def config(self) -> dict[str, dict]:
        """{section: {field: value}}, JSON-able: what snapshots and records keep of the trial."""
        return {s: {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(getattr(self, s)).items()}
                for s in SECTIONS}

    def get(self, dotted: str):
        section, field = dotted.split(".")
        return getattr(getattr(self, section), field)


def flatten(config: dict[str, dict]) -> dict[str, Any]:
    """{section: {key: v}} -> {"section.key": v}; lists become JSON strings (one column each)."""
    return {f"{s}.{k}": json.dumps(v) if isinstance(v, (list, tuple, dict)) else v
            for s in SECTIONS for k, v in config[s].items()}


@dataclass(frozen=True)
class Plan:
    """Every trial of a study, in order, and what the records of all of them share."""
    spec: StudySpec
    trials: tuple[Trial, ...]
    dropped: tuple[dict, ...]       # overrides of sweep points whose config repeats an earlier trial's
    swept: tuple[str, ...]          # the dotted fields any trial overrides (columns of every record row)
    params: dict[str, dict]         # trial_id -> flatten(trial.config()) (the `trials` table's columns)
    row_types: dict[str, str]       # Arrow types of the swept columns, and ...
    trial_types: dict[str, str]     # ... of every column of `params` (one schema across all trials)

    def trial(self, trial_id: str) -> Trial:
        return next(t for t in self.trials if t.trial_id == trial_id)

    def table(self) -> list[dict]:
        """Rows for `studyctl validate`: trial id + the swept fields."""
        return [{"trial_id": t.trial_id, **{k: t.get(k) for k in self.swept}} for t in self.trials]

    def label(self, trial_id: str) -> str:
        """A trial as people tell it apart: its index and swept values, e.g. "t003 base_width=16
        schedule=cosine seed=1" (MLflow run names; chart legends cut the end). A field is named by
        its last part unless two swept fields share it (training.seed, evaluation.seed)."""
        t = self.trial(trial_id)
        short = [k.split(".")[1] for k in self.swept]
        names = [s if short.count(s) == 1 else k for k, s in zip(self.swept, short)]
        values = [json.dumps(list(v), separators=(",", ":")) if isinstance(v, tuple) else v
                  for v in (t.get(k) for k in self.swept)]
        return " ".join([trial_id.split("-")[0]] + [f"{n}={v}" for n, v in zip(names, values)]) if self.swept \
            else trial_id

    def notes(self) -> list[str]:
        """Settings that are valid but have no effect in some trials (printed by `validate`)."""
        notes = []
        for t in self.trials:
            if t.diffusion.reverse_variance == "learned" and t.evaluation.sampler == "ddim":
                notes.append(f"{t.trial_id}: the learned variance is trained and recorded but unused for sampling "
                             f"(DDIM has its own variance, eta); evaluation.sampler: ddpm samples with it")
            if not t.model.class_conditional and t.evaluation.guidance_scale != 1.0:
                notes.append(f"{t.trial_id}: evaluation.guidance_scale={t.evaluation.guidance_scale} is unused "
                             f"(model.class_conditional is false)")
            if not t.model.class_conditional and t.training.label_dropout != TrainConfig.label_dropout:
                notes.append(f"{t.trial_id}: training.label_dropout={t.training.label_dropout} is unused "
                             f"(model.class_conditional is false)")
            if not t.training.compile and t.training.compile_mode != TrainConfig.compile_mode:
                notes.append(f"{t.trial_id}: training.compile_mode={t.training.compile_mode!r} is unused "
                             f"(training.compile is false)")
        return notes


def build_plan(spec: StudySpec) -> Plan:
    """Expand and validate the sweep: the one place a study becomes trials."""
    base = spec.sections()
    trials, seen, dropped = [], set(), []
    for overrides in sweep_points(spec.sweep, base):
        cfg = copy.deepcopy(base)
        for k, v in overrides.items():
            section, field = k.split(".")
            cfg[section][field] = v
        key = json.dumps(cfg, sort_keys=True, default=str)
        if key in seen:  # e.g. an arm repeating a grid point: run it once
            dropped.append(overrides)
            continue
        seen.add(key)
        trials.append(make_trial(spec, trial_id(len(trials), overrides), overrides, cfg))
    swept = tuple(sorted({k for t in trials for k in t.overrides}))
    params = {t.trial_id: flatten(t.config()) for t in trials}
    columns = {k: [p[k] for p in params.values()] for k in next(iter(params.values()))}
    return Plan(spec, tuple(trials), tuple(dropped), swept, params,
                row_types=param_types({k: columns[k] for k in swept}), trial_types=param_types(columns))


def trial_id(index: int, overrides: dict) -> str:
    """Deterministic: the same study file expands to the same ids (resume relies on it)."""
    h = hashlib.sha1(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:6]
    return f"t{index:03d}-{h}"


# ---------------------------------------------------------------------------- the sweep
def _check_path(base: dict, dotted: str, where: str) -> None:
    parts = dotted.split(".")
    if parts[0] not in SECTIONS or len(parts) != 2:
        raise StudyError(f"field '{where}': {dotted!r} is not a sweepable field; allowed: "
                         f"<section>.<key> with section one of {', '.join(SECTIONS)} (e.g. model.base_width)")
    if dotted in DERIVED:
        raise StudyError(f"field '{where}': {dotted!r} is set for each trial from {DERIVED[dotted]}; sweep that")
    if parts[1] not in base[parts[0]]:
        raise StudyError(f"field '{where}': unknown field {dotted!r}; allowed keys of {parts[0]}: "
                         f"{', '.join(base[parts[0]])}")


def _points(grid: dict[str, list], base: dict, where: str) -> list[dict]:
    for key, values in grid.items():
        _check_path(base, key, f"{where}.{key}")
        if not isinstance(values, list) or not values:
            raise StudyError(f"field '{where}.{key}': bad value {values!r}: a sweep needs a non-empty list")
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def sweep_points(sw: SweepSpec | None, base: dict) -> list[dict]:
    """The sweep's points: [{dotted field: value}] (one empty point without a sweep)."""
    if sw is None:
        return [{}]
    if not (sw.grid or sw.arms or sw.seeds or sw.random):
        raise StudyError("field 'sweep': the sweep is empty; list values under sweep.grid, sweep.arms, "
                         "sweep.seeds or sweep.random, or remove the sweep section for a single trial")
    points = _points(sw.grid, base, "sweep.grid") if sw.grid else [{}]
    if sw.arms and not sw.grid:
        points = []
    for i, arm in enumerate(sw.arms):
        if not arm:
            raise StudyError(f"field 'sweep.arms.{i}': an arm needs at least one field with values")
        points += _points(arm, base, f"sweep.arms.{i}")
    if sw.seeds is not None:
        if not sw.seeds:
            raise StudyError("field 'sweep.seeds': bad value []: give at least one seed or remove the key")
        if len(set(sw.seeds)) != len(sw.seeds):
            raise StudyError(f"field 'sweep.seeds': bad value {sw.seeds!r}: seeds must be distinct")
        points = [{**p, "training.seed": s} for p in points for s in sw.seeds]
    if sw.random:
        _points(sw.random, base, "sweep.random")  # checks the paths and lists
        rng = random.Random(sw.random_seed)
        draws = [{k: rng.choice(v) for k, v in sw.random.items()} for _ in range(sw.num_samples)]
        points = [{**p, **d} for p in points for d in draws]
    elif sw.num_samples != 1:
        raise StudyError(f"field 'sweep.num_samples': bad value {sw.num_samples}: only meaningful with "
                         f"sweep.random; allowed without it: 1")
    return points


# --------------------------------------------------------------------------- validation
def make_trial(spec: StudySpec, tid: str, overrides: dict, cfg: dict[str, dict]) -> Trial:
    """Validate a trial's sections after its overrides and resolve its model config."""
    where = f"trial {tid} ({', '.join(f'{k}={v!r}' for k, v in overrides.items()) or 'base'})"
    sections = {}
    for s in SECTIONS:
        try:
            validated = _ADAPTERS[s].validate_python(cfg[s])
        except ValidationError as e:
            raise StudyError(f"{where}: invalid swept value\n"
                             f"{_format_errors(e, s + '.', SECTION_TYPES[s])}") from None
        core = SECTION_CLASSES[s]  # the plain dataclass (the section class is its validating subclass)
        sections[s] = core(**{f.name: getattr(validated, f.name) for f in dataclasses.fields(core)})
    problem = _doomed_value(spec, **sections) or _path_refusal(spec, types.SimpleNamespace(**sections))
    if problem:
        raise StudyError(f"{where}: {problem}")
    try:
        sections["model"] = resolve_model(sections["model"], sections["data"], sections["diffusion"])
    except ValueError as e:
        raise StudyError(f"{where}: {e}") from None
    return Trial(tid, overrides, **sections)


# The paths a study runs a trial on, and the training path of diffusion_core.capabilities each one is.
# A trial in a stacked group is refused nothing here: what the group cannot honour makes it train alone
# (stacking.stack_groups; `validate` says why).
EXECUTION_PATHS = {"local": "alone", "ray": "alone", "ray_ddp": "ddp", "stacked": "stacked"}


def execution_paths(spec: StudySpec) -> tuple[str, ...]:
    """Where a trial of this study trains unless it joins a stacked group: alone under --local; under
    Ray as one worker, or DDP across resources.workers_per_trial."""
    return ("local", "ray_ddp" if spec.resources.workers_per_trial > 1 else "ray")


def _path_refusal(spec: StudySpec, configs) -> str | None:
    """The first field a path of this trial cannot honour (capabilities.SUPPORT), as an error message."""
    for path in execution_paths(spec):
        for field, message in refusals(EXECUTION_PATHS[path], configs):
            fix = " (or resources.workers_per_trial: 1)" if path == "ray_ddp" else ""
            return f"field '{field}': {message}{fix}; execution path {path!r}"
    return None


def resolve_model(model: UNetConfig, data: DataConfig, diffusion: DiffusionConfig) -> UNetConfig:
    """The U-Net of a trial: image channels and size from its data, a variance output if learned."""
    return dataclasses.replace(model, in_channels=IMAGE_CHANNELS[data.dataset],
                               image_size=data.image_size or NATIVE_IMAGE_SIZE[data.dataset],
                               learn_sigma=diffusion.reverse_variance == "learned")


def _doomed_value(spec: StudySpec, data: DataConfig, model: UNetConfig, diffusion: DiffusionConfig,
                  training: TrainConfig, evaluation: EvalConfig) -> str | None:
    """A value the schema accepts but the trial would fail on, or silently change: the message
    naming the field, the value and what is allowed; None if the trial config is sound."""
    n_workers = spec.resources.workers_per_trial
    if training.batch_size % n_workers:
        return (f"field 'training.batch_size': bad value {training.batch_size}: the global batch must be "
                f"divisible by resources.workers_per_trial={n_workers}")
    size = data.subset_size
    if size is not None and size < training.batch_size:
        return (f"field 'data.subset_size': bad value {size}: smaller than the batch size {training.batch_size}; "
                f"allowed: >= training.batch_size")
    n_train, n_val = SPLIT_SIZES[data.dataset]
    split = f"the {data.dataset} split has {n_train:,} training / {n_val:,} validation images"
    if size is not None and size > n_train:
        return f"field 'data.subset_size': bad value {size}: {split}; allowed: 1..{n_train}"
    if size is not None and data.subset_mode == "disjoint" and (data.subset_index + 1) * size > n_train:
        return (f"field 'data.subset_index': bad value {data.subset_index}: disjoint subsets of {size} images "
                f"fit {n_train // size} times in {n_train:,}; allowed: 0..{n_train // size - 1} "
                f"(or data.subset_mode: bootstrap)")
    if size is None and data.subset_index != 0:
        return (f"field 'data.subset_index': bad value {data.subset_index}: without data.subset_size the whole "
                f"split is used; allowed: 0 (or set data.subset_size)")
    if data.val_size is not None and data.val_size > n_val:
        return f"field 'data.val_size': bad value {data.val_size}: {split}; allowed: 1..{n_val}"
    native = NATIVE_IMAGE_SIZE[data.dataset]
    if data.image_size is not None and data.image_size < native:
        return (f"field 'data.image_size': bad value {data.image_size}: {data.dataset} images are {native}x{native} "
                f"and are zero-padded, never shrunk; allowed: null or >= {native}")
    if data.dataset == "molrg" and evaluation.clip_x0 is not None:
        return (f"field 'evaluation.clip_x0': bad value {evaluation.clip_x0}: molrg data is Gaussian, not bounded to "
                f"[-1, 1] (about a third of its pixels lie outside), so clipping x0 changes what is sampled; "
                f"allowed: null on data.dataset molrg")
    if data.dataset == "molrg" and evaluation.metrics:
        return ("field 'evaluation.metrics': bad value true: the classifier metrics (FID, IS, precision/recall) "
                "compare samples with MNIST, not with the molrg mixture; allowed: false on data.dataset molrg "
                "(`studyctl decompose` measures molrg samples exactly: log-density, coverage, pixel-space "
                "Frechet distance to the mixture)")
    if data.dataset == "molrg" and (evaluation.keep_samples or spec.analysis.generalization):
        field = "evaluation.keep_samples" if evaluation.keep_samples else "analysis.generalization"
        return (f"field '{field}': bad value true: kept samples and `studyctl generalization` work on uint8 images "
                f"in [-1, 1], which would clip molrg's unbounded draws; allowed: false on data.dataset molrg "
                f"(`studyctl decompose` places each model between the memorizing f*_D and the true f*)")
    if model.attention:
        channels = model.base_width * model.channel_mult[-1]
        if channels % model.attention_heads:
            return (f"field 'model.attention_heads': bad value {model.attention_heads}: must divide the "
                    f"{channels} channels where attention runs (base_width x channel_mult[-1]); allowed: "
                    f"{', '.join(str(h) for h in range(1, channels + 1) if channels % h == 0)}")
    if diffusion.schedule != "cosine" and diffusion.beta_start > diffusion.beta_end:
        return (f"field 'diffusion.beta_start': bad value {diffusion.beta_start}: above diffusion.beta_end="
                f"{diffusion.beta_end}; allowed: 0 < beta_start <= beta_end < 1")
    if evaluation.sampler == "ddim" and (evaluation.steps or 50) > diffusion.T:
        return f"field 'evaluation.steps': bad value {evaluation.steps}: allowed 1..diffusion.T={diffusion.T}"
    if isinstance(evaluation.t_grid, int) and not 2 <= evaluation.t_grid <= diffusion.T:
        return (f"field 'evaluation.t_grid': bad value {evaluation.t_grid}: the number of residual timesteps; "
                f"allowed: 2..diffusion.T={diffusion.T}, or a list of distinct timesteps in 1..{diffusion.T}")
    if isinstance(evaluation.t_grid, tuple):
        grid = evaluation.t_grid
        if not grid or min(grid) < 1 or max(grid) > diffusion.T or len(set(grid)) != len(grid):
            return (f"field 'evaluation.t_grid': bad value {list(evaluation.t_grid)}: allowed: distinct timesteps in "
                    f"1..diffusion.T={diffusion.T} (or a count n in 2..{diffusion.T})")
    too_many = _evaluation_memory(data, evaluation, spec.resources.stack)
    if too_many:
        return too_many
    val = data.val_size or n_val
    if evaluation.residual_images > val:
        return (f"field 'evaluation.residual_images': bad value {evaluation.residual_images}: more than the {val} "
                f"validation images; allowed: 1..{val} (data.val_size)")
    if evaluation.metrics and evaluation.is_splits > evaluation.n_samples // 2:
        # A split of one sample has IS exactly 1 (p(y|x) is its own marginal): a meaningless number.
        return (f"field 'evaluation.is_splits': bad value {evaluation.is_splits}: each IS split needs >= 2 of the "
                f"{evaluation.n_samples} samples; allowed: 1..{max(1, evaluation.n_samples // 2)}")
    return None


# What the evaluations of one process may hold in memory. Each trial keeps max(n_samples, grid_images)
# images' worth of fixed starting noise x_T in float32 for the whole trial (Evaluator.__init__), and at
# each evaluation the samples in uint8 plus their float32 copy for the classifier: 4 + 1 + 4 bytes per
# pixel value (the metrics' features and distance chunks are small beside them). A stacked group
# (resources.stack: K) holds up to K trials' evaluators in one process.
EVAL_MEMORY_LIMIT_GIB = 8
EVAL_BYTES_PER_VALUE = 4 + 1 + 4


def _evaluation_memory(data: DataConfig, evaluation: EvalConfig, stack: int = 1) -> str | None:
    """The error for a sample count whose evaluation arrays exceed EVAL_MEMORY_LIMIT_GIB (None if they fit)."""
    side = data.image_size or NATIVE_IMAGE_SIZE[data.dataset]
    shape = f"{IMAGE_CHANNELS[data.dataset]}x{side}x{side}"
    per_sample = EVAL_BYTES_PER_VALUE * IMAGE_CHANNELS[data.dataset] * side * side
    allowed = EVAL_MEMORY_LIMIT_GIB * 2 ** 30 // (per_sample * stack)
    field = "n_samples" if evaluation.n_samples >= evaluation.grid_images else "grid_images"
    n = getattr(evaluation, field)
    if n <= allowed:
        return None
    per_process = f", x {stack} trials of a stacked group (resources.stack)" if stack > 1 else ""
    return (f"field 'evaluation.{field}': bad value {n}: an evaluation would hold {n:,} images of {shape} (their "
            f"starting noise in float32 for the whole trial, then the uint8 samples and a float32 copy for the "
            f"classifier: {per_sample:,} bytes each{per_process}) = {n * per_sample * stack / 2 ** 30:,.1f} GiB; "
            f"allowed: 1..{allowed} (within {EVAL_MEMORY_LIMIT_GIB} GiB per process)")
