"""Study files: YAML -> a validated `StudySpec` -> a list of trial configs.

A study file has the sections below (every key optional except `name`; defaults are
the thesis's Table 1). Unknown keys are errors, not silently ignored: a typo in a sweep
must not run 30 trials of the wrong thing.

    name: quickstart
    output: runs/quickstart          # default runs/<name> (relative to the working dir)
    ray_address: null                # null: start a local Ray sized to the machine
    data:       {dataset, root, subset_size, subset_index, subset_mode, image_size, val_size, ...}
    model:      {base_width, channel_mult, blocks_per_level, dropout, attention, ...}
    diffusion:  {T, schedule, beta_start, beta_end, reverse_variance, loss}
    training:   {epochs, batch_size, lr, ema_decay, seed, max_steps, log_every_first, log_every}
    evaluation: {every, start, n_samples, sampler, steps, is_splits, t_grid, seed, ...}
    sweep:      {grid: {dotted.field: [values]}, arms: [{...}], seeds: [..], random: {..}, num_samples, asha}
    resources:  {workers_per_trial, cpus_per_worker, gpus_per_worker, max_concurrent_trials, max_failures}
    tracking:   {enabled, uri, experiment}

Sweep semantics: the trials are every point of `grid`, plus every point of each arm
in `arms` (an arm overrides the base config, not the grid), each crossed with `seeds`
(-> training.seed) and, when `random` is given, with `num_samples` seeded random draws
of its choices. Any field of data/model/diffusion/training/evaluation can be swept by
its dotted name, epochs included.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import random
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveFloat, Strict, ValidationError

# Integers and booleans are strict (YAML `width: "8"` or `attention: 1` is a mistake worth
# reporting); floats are lax because PyYAML reads `2e-4` (no dot) as a string.
StrictInt = Annotated[int, Strict()]
PositiveInt = Annotated[int, Strict(), Field(gt=0)]
NonNegativeInt = Annotated[int, Strict(), Field(ge=0)]
StrictBool = Annotated[bool, Strict()]
UnitInterval = Annotated[float, Field(ge=0.0, lt=1.0)]   # [0, 1): Adam's betas

SECTIONS = ("data", "model", "diffusion", "training", "evaluation")
PACKAGED_STUDIES = Path(__file__).parent / "studies"


class StudyError(ValueError):
    """A study file is wrong; the message names the field, the value and what is allowed."""


class _Strict(BaseModel):
    # extra="forbid": an unknown (misspelt) key is an error naming the key.
    model_config = ConfigDict(extra="forbid")


class DataSpec(_Strict):
    dataset: Literal["mnist", "cifar10"] = "mnist"
    root: Optional[str] = None               # null: $STUDYCTL_DATA_ROOT, else ./data
    split_seed: StrictInt = 0
    subset_size: Optional[PositiveInt] = None   # null: the whole 48,000-image training split
    subset_index: NonNegativeInt = 0
    subset_mode: Literal["disjoint", "bootstrap"] = "disjoint"
    data_seed: StrictInt = 0
    image_size: Optional[PositiveInt] = None
    val_size: Optional[PositiveInt] = None      # null: the whole 12,000-image validation split


class ModelSpec(_Strict):
    base_width: PositiveInt = 32
    channel_mult: list[PositiveInt] = Field(default_factory=lambda: [1, 2, 4], min_length=1)
    blocks_per_level: PositiveInt = 2
    bottleneck_blocks: NonNegativeInt = 2
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    attention: StrictBool = False
    attention_heads: PositiveInt = 4
    class_conditional: StrictBool = False     # label embedding + null label: classifier-free guidance


class DiffusionSpec(_Strict):
    T: Annotated[int, Strict(), Field(ge=2)] = 1000
    schedule: Literal["linear", "cosine", "quadratic", "sigmoid"] = "linear"
    beta_start: float = Field(1e-4, gt=0.0, lt=1.0)
    beta_end: float = Field(0.02, gt=0.0, lt=1.0)
    reverse_variance: Literal["beta", "beta_tilde", "learned"] = "beta"   # learned: iDDPM, needs loss: hybrid
    loss: Literal["simple", "elbo", "hybrid"] = "simple"


class TrainingSpec(_Strict):
    epochs: PositiveInt = 25
    batch_size: PositiveInt = 16              # global batch, split over the DDP workers
    lr: PositiveFloat = 2e-4
    adam_betas: tuple[UnitInterval, UnitInterval] = (0.9, 0.999)
    adam_eps: PositiveFloat = 1e-8
    ema_decay: float = Field(0.9999, ge=0.0, lt=1.0)
    ema_warmup: StrictBool = False            # decay min(ema_decay, (1+k)/(10+k)) at update k; thesis: off
    seed: StrictInt = 0
    max_steps: Optional[PositiveInt] = None
    val_every_epoch: StrictBool = True        # false: validation loss at evaluations only (tiny epochs: N = 16)
    grad_clip: Optional[PositiveFloat] = None
    log_every_first: NonNegativeInt = 1000    # every step's loss for the first N steps (Fig. 26b)
    log_every: PositiveInt = 100              # then every N steps
    precision: Literal["fp32", "bf16"] = "fp32"   # bf16 autocast of the forward (GPU fast path)
    channels_last: StrictBool = False
    compile: StrictBool = False               # torch.compile the training forward ...
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"  # reduce-overhead: CUDA graphs
    label_dropout: float = Field(0.1, ge=0.0, lt=1.0)   # class-conditional: P(label -> null label)


class EvaluationSpec(_Strict):
    every: PositiveInt = 2000                 # evaluate every N iterations ...
    start: NonNegativeInt = 8000              # ... from iteration M on (and always at the end)
    val_every: Optional[PositiveInt] = None   # epoch-end validation losses only at epochs passing a multiple
    #                                           of N steps (small training sets have many epochs); null: every epoch
    seed: StrictInt = 0                             # study-level evaluation seed, identical for all trials
    n_samples: PositiveInt = 1000             # samples for FID/IS/precision/recall
    grid_images: PositiveInt = 64             # images in the saved sample grid
    sampler: Literal["ddpm", "ddim"] = "ddpm"
    steps: Optional[PositiveInt] = None       # DDIM steps
    eta: NonNegativeFloat = 0.0
    is_splits: PositiveInt = 5                # thesis: IS averaged over 5 runs
    t_grid: PositiveInt | list[PositiveInt] = 40   # residual timesteps: how many, or an explicit list
    residual_images: PositiveInt = 256
    metrics: StrictBool = True
    keep_checkpoints: Optional[PositiveInt] = 3    # full resume states kept (EMA snapshots: all)
    batch_size: PositiveInt = 256             # sampling / residual batch (a GPU takes 1,000s)
    precision: Literal["fp32", "bf16"] = "fp32"   # bf16 autocast of the network while sampling
    compile: StrictBool = False               # torch.compile the sampling network (CUDA graphs on a GPU)
    guidance_scale: NonNegativeFloat = 1.0    # classifier-free guidance s: 0 unconditional, 1 conditional
    progressive_t: list[NonNegativeInt] = Field(default_factory=list)  # frames (t) of the progressive figure
    progressive_rows: PositiveInt = 8         # samples in the progressive-generation figure


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
    # How a trial's workers are placed: PACK (fewest nodes), SPREAD (across nodes), STRICT_*.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


class TrackingSpec(_Strict):
    enabled: StrictBool = True                # false: Parquet records only (no MLflow; `--no-tracking`)
    uri: Optional[str] = None                 # null: sqlite:///<output>/mlflow.db
    experiment: Optional[str] = None          # null: the study name


class AnalysisSpec(_Strict):
    figures: StrictBool = True                # `studyctl figures` after the sweep
    decompose: StrictBool = False             # `studyctl decompose` after the sweep (needs sweep.seeds)
    decompose_points: PositiveInt = 256       # fixed validation points per timestep
    generalization: StrictBool = False        # `studyctl generalization` after the sweep (needs data.subset_index pairs)


class StudySpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    description: str = ""
    output: Optional[str] = None
    ray_address: Optional[str] = None
    data: DataSpec = Field(default_factory=DataSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    diffusion: DiffusionSpec = Field(default_factory=DiffusionSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    sweep: Optional[SweepSpec] = None
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    analysis: AnalysisSpec = Field(default_factory=AnalysisSpec)

    def output_dir(self, override: str | os.PathLike | None = None) -> Path:
        return Path(override or self.output or Path("runs") / self.name).expanduser().resolve()


# ----------------------------------------------------------------------------- loading
def resolve_study_path(file: str | os.PathLike) -> Path:
    """The file as given, else a packaged study of that name (`quickstart`, `quickstart.yaml`)."""
    p = Path(file).expanduser()
    if p.exists():
        return p
    name = p.name if p.suffix in (".yaml", ".yml") else p.name + ".yaml"
    packaged = PACKAGED_STUDIES / name
    if len(p.parts) <= 2 and packaged.exists():  # a bare name, or studies/<name>
        return packaged
    known = ", ".join(sorted(f.stem for f in PACKAGED_STUDIES.glob("*.yaml")))
    raise StudyError(f"study file {str(file)!r} not found in {Path.cwd()} nor among the packaged studies "
                     f"({known}). Give a path to a YAML file or one of those names.")


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """The keys allowed beside loc[-1]: the fields of the section (model) that loc[:-1] leads to."""
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        ann = field.annotation if field is not None else None
        ann = next((a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)), ann)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return list(model.model_fields)


def _format_errors(err: ValidationError, prefix: str = "", model: type[BaseModel] | None = None) -> str:
    lines = []
    for e in err.errors():
        loc = prefix + ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(model or StudySpec, e["loc"])
            lines.append(f"field '{loc}': unknown key (check the spelling); allowed keys here: "
                         f"{', '.join(allowed) if allowed else 'see orchestrator/spec.py'}")
        elif e["type"] == "missing":
            lines.append(f"field '{loc}': required but missing")
        else:
            lines.append(f"field '{loc}': bad value {e.get('input')!r}: {e['msg']}")
    return "\n".join(lines)


def parse_study(raw: Any, source: str = "<study>") -> StudySpec:
    if not isinstance(raw, dict):
        raise StudyError(f"{source}: the study file must be a YAML mapping (name: ..., data: ..., ...), "
                         f"got {type(raw).__name__}")
    try:
        spec = StudySpec.model_validate(raw)
    except ValidationError as e:
        raise StudyError(f"{source}: invalid study file\n{_format_errors(e)}") from None
    check_study(spec, source)
    return spec


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping: PyYAML keeps the last one
    silently, so `lr: 1e-3` further down would quietly win over the `lr` the reader sees first."""


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    first: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        try:
            if key in first:
                raise StudyError(f"field {key!r}: given twice in the same section (lines {first[key]} and {line}); "
                                 f"YAML would keep only the last: allowed once")
            first[key] = line
        except TypeError:  # an unhashable key: PyYAML itself reports it below
            pass
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def load_yaml(text: str):
    """A study file's YAML (duplicate keys are errors)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def load_study(file: str | os.PathLike, overrides: list[str] = ()) -> StudySpec:
    """Read and validate a study file; `overrides` ("evaluation.n_samples=10000", values in YAML
    syntax) replace fields first, so they are validated (and snapshotted) like the file's own."""
    path = resolve_study_path(file)
    try:
        raw = load_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise StudyError(f"{path}: not valid YAML: {e}") from None
    except StudyError as e:
        raise StudyError(f"{path}: {e}") from None
    if overrides and isinstance(raw, dict):
        raw = apply_overrides(raw, overrides)
    return parse_study(raw, str(path) + (f" with --set {' '.join(overrides)}" if overrides else ""))


DOTTED_CONTAINERS = ("sweep.grid", "sweep.random")


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise StudyError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set training.epochs=5")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise StudyError(f"--set {item!r}: the value is not valid YAML: {e}") from None
        key = key.strip()
        # sweep.grid / sweep.random map dotted field names to lists: in
        # `sweep.grid.model.base_width=[8]` the container is sweep.grid, the key model.base_width.
        container = next((c for c in DOTTED_CONTAINERS if key.startswith(c + ".")), None)
        if container is not None:
            parents, leaf = container.split("."), key[len(container) + 1:]
        else:
            *parents, leaf = key.split(".")
        cur = raw
        for part in parents:
            if cur.get(part) is None:
                cur[part] = {}
            if not isinstance(cur[part], dict):
                raise StudyError(f"--set {item!r}: {part!r} is not a section")
            cur = cur[part]
        cur[leaf] = parsed
    return raw


# ---------------------------------------------------------------------------- expansion
def _get(d: dict, dotted: str):
    cur = d
    for part in dotted.split("."):
        cur = cur[part]
    return cur


def _set(d: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    cur = d
    for part in parts[:-1]:
        cur = cur[part]
    cur[parts[-1]] = value


def _check_path(base: dict, dotted: str, where: str) -> None:
    parts = dotted.split(".")
    if parts[0] not in SECTIONS or len(parts) != 2:
        raise StudyError(f"field '{where}': {dotted!r} is not a sweepable field; allowed: "
                         f"<section>.<key> with section one of {', '.join(SECTIONS)} (e.g. model.base_width)")
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


def trial_id(index: int, overrides: dict) -> str:
    """Deterministic: the same study file expands to the same ids (resume relies on it)."""
    h = hashlib.sha1(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:6]
    return f"t{index:03d}-{h}"


def expand(spec: StudySpec) -> list[dict]:
    """Trial configs: [{"trial_id", "overrides": {dotted: value}, "config": {section: {...}}}]."""
    return expand_with_duplicates(spec)[0]


def expand_with_duplicates(spec: StudySpec) -> tuple[list[dict], list[dict]]:
    """(trials, dropped): sweep points whose resolved config equals an earlier trial's are run
    once; `dropped` lists their overrides (for `studyctl validate` to say so)."""
    base = spec.model_dump(include=set(SECTIONS), mode="json")
    sw = spec.sweep
    if sw is None:
        points = [{}]
    else:
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
    trials, seen, dropped = [], set(), []
    for i, ov in enumerate(points):
        cfg = copy.deepcopy(base)
        for k, v in ov.items():
            _set(cfg, k, v)
        key = json.dumps(cfg, sort_keys=True)
        if key in seen:  # e.g. an arm repeating a grid point: run it once
            dropped.append(ov)
            continue
        seen.add(key)
        trials.append({"trial_id": trial_id(len(trials), ov), "overrides": ov, "config": cfg})
    for t in trials:
        _validate_trial(spec, t)
    return trials, dropped


def swept_fields(trials: list[dict]) -> list[str]:
    return sorted({k for t in trials for k in t["overrides"]})


# --------------------------------------------------------------------------- validation
def _validate_trial(spec: StudySpec, trial: dict) -> None:
    """Re-validate a trial's config after its overrides, and build the diffusion_core configs."""
    where = f"trial {trial['trial_id']} ({', '.join(f'{k}={v!r}' for k, v in trial['overrides'].items()) or 'base'})"
    models = {"data": DataSpec, "model": ModelSpec, "diffusion": DiffusionSpec, "training": TrainingSpec,
              "evaluation": EvaluationSpec}
    for section, model in models.items():
        try:
            model.model_validate(trial["config"][section])
        except ValidationError as e:
            raise StudyError(f"{where}: invalid swept value\n{_format_errors(e, section + '.', model)}") from None
    cfg = trial["config"]
    n_workers = spec.resources.workers_per_trial
    bs = cfg["training"]["batch_size"]
    if bs % n_workers:
        raise StudyError(f"{where}: field 'training.batch_size': bad value {bs}: the global batch must be "
                         f"divisible by resources.workers_per_trial={n_workers}")
    size = cfg["data"]["subset_size"]
    if size is not None and size < bs:
        raise StudyError(f"{where}: field 'data.subset_size': bad value {size}: smaller than the batch "
                         f"size {bs}; allowed: >= training.batch_size")
    problem = _doomed_value(cfg)
    if problem:
        raise StudyError(f"{where}: {problem}")
    if cfg["evaluation"]["sampler"] == "ddim" and (cfg["evaluation"]["steps"] or 50) > cfg["diffusion"]["T"]:
        raise StudyError(f"{where}: field 'evaluation.steps': bad value {cfg['evaluation']['steps']}: "
                         f"allowed 1..diffusion.T={cfg['diffusion']['T']}")
    f = cfg["diffusion"]
    if (f["reverse_variance"] == "learned") != (f["loss"] == "hybrid"):
        raise StudyError(f"{where}: field 'diffusion.reverse_variance': bad value {f['reverse_variance']!r} with "
                         f"diffusion.loss={f['loss']!r}: a learned variance is trained only by L_vlb; allowed: "
                         f"reverse_variance: learned together with loss: hybrid (iDDPM), or beta / beta_tilde "
                         f"with simple / elbo")
    try:
        to_core(cfg)
    except (ValueError, TypeError) as e:
        raise StudyError(f"{where}: {e}") from None


def _doomed_value(cfg: dict) -> str | None:
    """A value the schema accepts but the trial would fail on, or silently change: the message
    naming the field, the value and what is allowed; None if the trial config is sound."""
    from diffusion_core.data import NATIVE_IMAGE_SIZE, SPLIT_SIZES

    d, m, f, e = cfg["data"], cfg["model"], cfg["diffusion"], cfg["evaluation"]
    n_train, n_val = SPLIT_SIZES[d["dataset"]]
    split = f"the {d['dataset']} split has {n_train:,} training / {n_val:,} validation images"
    size = d["subset_size"]
    if size is not None and size > n_train:
        return f"field 'data.subset_size': bad value {size}: {split}; allowed: 1..{n_train}"
    if size is not None and d["subset_mode"] == "disjoint" and (d["subset_index"] + 1) * size > n_train:
        return (f"field 'data.subset_index': bad value {d['subset_index']}: disjoint subsets of {size} images "
                f"fit {n_train // size} times in {n_train:,}; allowed: 0..{n_train // size - 1} "
                f"(or data.subset_mode: bootstrap)")
    if size is None and d["subset_index"] != 0:
        return (f"field 'data.subset_index': bad value {d['subset_index']}: without data.subset_size the whole "
                f"split is used; allowed: 0 (or set data.subset_size)")
    if d["val_size"] is not None and d["val_size"] > n_val:
        return f"field 'data.val_size': bad value {d['val_size']}: {split}; allowed: 1..{n_val}"
    native = NATIVE_IMAGE_SIZE[d["dataset"]]
    if d["image_size"] is not None and d["image_size"] < native:
        return (f"field 'data.image_size': bad value {d['image_size']}: {d['dataset']} images are {native}x{native} "
                f"and are zero-padded, never shrunk; allowed: null or >= {native}")
    if m["attention"]:
        channels = m["base_width"] * m["channel_mult"][-1]
        if channels % m["attention_heads"]:
            return (f"field 'model.attention_heads': bad value {m['attention_heads']}: must divide the "
                    f"{channels} channels where attention runs (base_width x channel_mult[-1]); allowed: "
                    f"{', '.join(str(h) for h in range(1, channels + 1) if channels % h == 0)}")
    if f["schedule"] != "cosine" and f["beta_start"] > f["beta_end"]:
        return (f"field 'diffusion.beta_start': bad value {f['beta_start']}: above diffusion.beta_end="
                f"{f['beta_end']}; allowed: 0 < beta_start <= beta_end < 1")
    T = f["T"]
    if isinstance(e["t_grid"], int) and not 2 <= e["t_grid"] <= T:
        return (f"field 'evaluation.t_grid': bad value {e['t_grid']}: the number of residual timesteps; "
                f"allowed: 2..diffusion.T={T}, or an explicit list of timesteps")
    if isinstance(e["t_grid"], list):
        if not e["t_grid"] or max(e["t_grid"]) > T or len(set(e["t_grid"])) != len(e["t_grid"]):
            return (f"field 'evaluation.t_grid': bad value {e['t_grid']}: allowed: distinct timesteps in "
                    f"1..diffusion.T={T}")
    val = d["val_size"] or n_val
    if e["residual_images"] > val:
        return (f"field 'evaluation.residual_images': bad value {e['residual_images']}: more than the {val} "
                f"validation images; allowed: 1..{val} (data.val_size)")
    if e["metrics"] and e["is_splits"] > e["n_samples"] // 2:
        # A split of one sample has IS exactly 1 (p(y|x) is its own marginal): a meaningless number.
        return (f"field 'evaluation.is_splits': bad value {e['is_splits']}: each IS split needs >= 2 of the "
                f"{e['n_samples']} samples; allowed: 1..{max(1, e['n_samples'] // 2)}")
    return None


def study_notes(trials: list[dict]) -> list[str]:
    """Settings that are valid but have no effect in some trials (printed by `validate`)."""
    notes = []
    for t in trials:
        c = t["config"]
        if c["diffusion"]["reverse_variance"] == "learned" and c["evaluation"]["sampler"] == "ddim":
            notes.append(f"{t['trial_id']}: the learned variance is trained and recorded but unused for sampling "
                         f"(DDIM has its own variance, eta); evaluation.sampler: ddpm samples with it")
        if not c["model"]["class_conditional"] and c["evaluation"]["guidance_scale"] != 1.0:
            notes.append(f"{t['trial_id']}: evaluation.guidance_scale={c['evaluation']['guidance_scale']} is unused "
                         f"(model.class_conditional is false)")
    return notes


def check_study(spec: StudySpec, source: str = "<study>") -> None:
    """Whole-study checks: the data root, resources, and every trial of the sweep."""
    from diffusion_core.data import resolve_data_root

    root = resolve_data_root(spec.data.root)
    if spec.data.dataset == "mnist":
        needed = root / "MNIST" / "raw"
    else:
        needed = root / "cifar-10-batches-py"
    if not needed.exists():
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
    try:
        expand(spec)
    except StudyError as e:
        raise StudyError(f"{source}: {e}") from None


# ------------------------------------------------------------------ to diffusion_core
def to_core(cfg: dict, *, image_channels: int | None = None):
    """A trial's config dict -> (DataConfig, UNetConfig, DiffusionConfig, TrainConfig, EvalConfig)."""
    from diffusion_core.data import DataConfig
    from diffusion_core.evaluation import EvalConfig
    from diffusion_core.schedules import ScheduleConfig
    from diffusion_core.train import DiffusionConfig, TrainConfig
    from diffusion_core.unet import UNetConfig

    d, m, f, t, e = (cfg[s] for s in SECTIONS)
    data = DataConfig(**d)
    native = 28 if d["dataset"] == "mnist" else 32
    model = UNetConfig(in_channels=image_channels or (1 if d["dataset"] == "mnist" else 3),
                       image_size=d["image_size"] or native, base_width=m["base_width"],
                       channel_mult=tuple(m["channel_mult"]), blocks_per_level=m["blocks_per_level"],
                       bottleneck_blocks=m["bottleneck_blocks"], dropout=m["dropout"], attention=m["attention"],
                       attention_heads=m["attention_heads"], class_conditional=m["class_conditional"],
                       learn_sigma=f["reverse_variance"] == "learned")
    diffusion = DiffusionConfig(schedule=ScheduleConfig(name=f["schedule"], T=f["T"], beta_start=f["beta_start"],
                                                        beta_end=f["beta_end"]),
                                reverse_variance=f["reverse_variance"], loss=f["loss"])
    training = TrainConfig(epochs=t["epochs"], batch_size=t["batch_size"], lr=t["lr"],
                           adam_betas=tuple(t["adam_betas"]), adam_eps=t["adam_eps"], ema_decay=t["ema_decay"],
                           ema_warmup=t["ema_warmup"],
                           seed=t["seed"], max_steps=t["max_steps"], grad_clip=t["grad_clip"],
                           val_every_epoch=t["val_every_epoch"],
                           log_every_first=t["log_every_first"], log_every=t["log_every"],
                           eval_every=e["every"], eval_start=e["start"], val_every_steps=e["val_every"],
                           precision=t["precision"],
                           channels_last=t["channels_last"], compile=t["compile"],
                           compile_mode=t["compile_mode"], label_dropout=t["label_dropout"])
    t_grid = e["t_grid"] if isinstance(e["t_grid"], int) else tuple(e["t_grid"])
    if not isinstance(t_grid, int) and max(t_grid) > f["T"]:
        raise ValueError(f"field 'evaluation.t_grid': bad value {list(t_grid)}: timesteps must lie in 1..T={f['T']}")
    evaluation = EvalConfig(n_samples=e["n_samples"], grid_images=e["grid_images"], sampler=e["sampler"],
                            steps=e["steps"], eta=e["eta"], is_splits=e["is_splits"], t_grid=t_grid,
                            residual_images=e["residual_images"], seed=e["seed"], metrics=e["metrics"],
                            batch_size=e["batch_size"], precision=e["precision"], compile=e["compile"],
                            guidance_scale=e["guidance_scale"], progressive_t=tuple(e["progressive_t"]),
                            progressive_rows=e["progressive_rows"])
    return data, model, diffusion, training, evaluation


def flatten(cfg: dict) -> dict[str, Any]:
    """{section: {key: v}} -> {"section.key": v}; lists become JSON strings (one column each)."""
    out = {}
    for section in SECTIONS:
        for k, v in cfg[section].items():
            out[f"{section}.{k}"] = json.dumps(v) if isinstance(v, (list, tuple, dict)) else v
    return out


def trial_table(spec: StudySpec, trials: list[dict]) -> list[dict]:
    """Rows for `studyctl validate`: trial id + the swept fields."""
    keys = swept_fields(trials)
    return [{"trial_id": t["trial_id"], **{k: _get(t["config"], k) for k in keys}} for t in trials]
