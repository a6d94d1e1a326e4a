"""Study files: the shipped studies validate, sweeps expand as documented, mistakes are named.

No Ray, no training: these run in well under a second each.
"""
from __future__ import annotations

import copy
import json

import pytest
import yaml

from orchestrator.plan import build_plan
from orchestrator.spec import StudyError, parse_study
from orchestrator.study_file import PACKAGED_STUDIES, load_study_file, resolve_study_path


def tiny(data_root, **over) -> dict:
    d = {
        "name": "tiny",
        "data": {"root": str(data_root), "subset_size": 256, "val_size": 128},
        "model": {"base_width": 8, "channel_mult": [1, 2], "blocks_per_level": 1, "bottleneck_blocks": 1},
        "diffusion": {"T": 200},
        "training": {"epochs": 1, "batch_size": 16, "eval_every": 10, "eval_start": 10},
        "evaluation": {"n_samples": 16, "sampler": "ddim", "steps": 5, "residual_images": 64},
        "sweep": {"grid": {"model.base_width": [8, 16]}},
        "resources": {"workers_per_trial": 2},
    }
    for k, v in over.items():
        cur = d
        *path, last = k.split("/")
        for p in path:
            cur = cur.setdefault(p, {})
        if v is _DELETE:
            cur.pop(last, None)
        else:
            cur[last] = v
    return d


_DELETE = object()


# ------------------------------------------------------------------------------ shipped
@pytest.mark.parametrize("name", ["thesis", "bias_variance", "quickstart"])
def test_packaged_studies_validate(name, data_root, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a bare name resolves from any folder
    spec = load_study_file(name)
    plan = build_plan(spec)
    trials = plan.trials
    assert spec.name == name
    assert resolve_study_path(f"{name}.yaml") == PACKAGED_STUDIES / f"{name}.yaml"
    if name == "thesis":  # Table 1 exactly
        assert len(trials) == 1
        t = spec.training
        assert (t.epochs, t.batch_size, t.lr, t.adam_betas, t.adam_eps, t.ema_decay) == \
            (25, 16, 2e-4, (0.9, 0.999), 1e-8, 0.9999)
        assert (spec.training.eval_every, spec.training.eval_start, spec.evaluation.is_splits) == (2000, 8000, 5)
        assert (spec.model.base_width, spec.model.channel_mult, spec.model.blocks_per_level,
                spec.model.dropout) == (32, (1, 2, 4), 2, 0.1)
        assert (spec.diffusion.T, spec.diffusion.schedule, spec.diffusion.beta_start,
                spec.diffusion.beta_end) == (1000, "linear", 1e-4, 0.02)
        assert spec.data.subset_size is None
        assert spec.diffusion.reverse_variance == "beta_tilde" and not spec.training.ema_warmup  # sigma_q^2 (eq. 40)
    if name == "bias_variance":
        # 5 x 2 grid + the 1,000 / 6,000 arm + 2 disjoint 24,000 subsets, x 3 seeds; the arm's 48,000
        # point is the width-32 linear grid trial, run once
        assert len(trials) == (5 * 2 + 2 + 2) * 3 == 42
        assert len(plan.dropped) == 3
        assert set(plan.swept) == {"model.base_width", "diffusion.schedule", "training.seed",
                                   "data.subset_size", "data.subset_index"}
        assert spec.training.ema_warmup and spec.diffusion.reverse_variance == "beta_tilde"
        assert spec.training.val_every == 3000 and trials[0].training.val_every == 3000
        from diffusion_core.data import steps_per_epoch
        for t in trials:  # every trial runs exactly the thesis's 75,000 optimizer steps
            tr, size = t.training, t.data.subset_size
            assert min(steps_per_epoch(size, 16) * tr.epochs, tr.max_steps) == 75_000
        halves = [t for t in trials if t.data.subset_size == 24000]
        assert sorted({t.data.subset_index for t in halves}) == [0, 1] and len(halves) == 6
        assert "prefix" in (PACKAGED_STUDIES / "bias_variance.yaml").read_text()  # the epochs comment
    if name == "quickstart":
        assert len(trials) >= 4 and spec.resources.workers_per_trial == 2
        assert spec.evaluation.sampler == "ddim" and spec.data.subset_size <= 2000


def test_top_level_studies_are_the_packaged_files():
    from pathlib import Path

    top = Path(__file__).resolve().parents[1] / "studies"
    for name in ("thesis", "bias_variance", "quickstart"):
        assert (top / f"{name}.yaml").read_text() == (PACKAGED_STUDIES / f"{name}.yaml").read_text()


# ---------------------------------------------------------------------------- expansion
def test_expansion_grid_arms_seeds_random(data_root):
    d = tiny(data_root)
    d["sweep"] = {"grid": {"model.base_width": [8, 16], "diffusion.schedule": ["linear", "cosine"]},
                  "arms": [{"data.subset_size": [128, 512]}], "seeds": [0, 1]}
    trials = build_plan(parse_study(d)).trials
    assert len(trials) == (2 * 2 + 2) * 2
    ids = [t.trial_id for t in trials]
    assert len(set(ids)) == len(ids)
    assert ids == [t.trial_id for t in build_plan(parse_study(copy.deepcopy(d))).trials]  # deterministic
    arm = [t for t in trials if "data.subset_size" in t.overrides]
    assert all(t.model.base_width == 8 for t in arm)  # arms override the base, not the grid
    d["sweep"] = {"random": {"training.lr": [1e-4, 2e-4, 4e-4]}, "num_samples": 3, "random_seed": 1}
    trials = build_plan(parse_study(d)).trials
    assert len(trials) <= 3 and all(t.training.lr in (1e-4, 2e-4, 4e-4) for t in trials)


def test_epochs_can_be_swept_and_trials_carry_core_configs(data_root):
    from diffusion_core import DataConfig, TrainConfig, UNetConfig
    from diffusion_core.config import DiffusionConfig, EvalConfig

    d = tiny(data_root, **{"sweep": {"grid": {"training.epochs": [1, 3]}}})
    trials = build_plan(parse_study(d)).trials
    assert [t.training.epochs for t in trials] == [1, 3]
    t = trials[1]
    assert [type(c) for c in (t.data, t.model, t.diffusion, t.training, t.evaluation)] == \
        [DataConfig, UNetConfig, DiffusionConfig, TrainConfig, EvalConfig]
    assert t.training.epochs == 3 and t.model.base_width == 8 and t.diffusion.schedule_config.T == 200
    assert t.training.eval_every == 10 and t.evaluation.sampler == "ddim" and t.data.subset_size == 256
    assert (t.model.in_channels, t.model.image_size, t.model.learn_sigma) == (1, 28, False)   # spec.DERIVED


def test_identical_trials_are_expanded_once_and_validate_says_so(data_root, tmp_path):
    from typer.testing import CliRunner

    from orchestrator.cli import app

    d = tiny(data_root)
    d["data"]["subset_size"] = 256
    # 3 sweep points, 2 configs: the second arm's point (seed 0 = the default) repeats the first arm's 256
    d["sweep"] = {"arms": [{"data.subset_size": [128, 256]}, {"training.seed": [0]}], "seeds": [0]}
    plan = build_plan(parse_study(d))
    trials, dropped = plan.trials, plan.dropped
    assert [t.data.subset_size for t in trials] == [128, 256] and len(dropped) == 1
    keys = [json.dumps(t.config(), sort_keys=True) for t in trials]
    assert len(set(keys)) == len(keys)
    f = tmp_path / "dup.yaml"
    f.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(app, ["validate", str(f)])
    assert r.exit_code == 0, r.output
    assert "2 trial(s)" in r.output and "1 duplicate trial(s) dropped" in r.output


def test_no_sweep_is_one_trial(data_root):
    assert len(build_plan(parse_study(tiny(data_root, sweep=_DELETE))).trials) == 1


def test_yaml_floats_without_dot_are_accepted(data_root):
    spec = parse_study(yaml.safe_load(yaml.safe_dump(tiny(data_root)).replace("batch_size: 16",
                                                                                "batch_size: 16\n  lr: 2e-4")))
    assert spec.training.lr == 2e-4


# ----------------------------------------------------------------------- bad study files
BAD = [
    # (kind, overrides, words the message must contain: field, bad value, what is allowed)
    ("unknown key", {"model/base_widht": 8}, ["model.base_widht", "unknown key"]),
    ("unknown section", {"trainig": {"epochs": 1}}, ["trainig", "unknown key"]),
    ("wrong type", {"model/base_width": "wide"}, ["model.base_width", "'wide'", "integer"]),
    ("quoted integer", {"training/epochs": "3"}, ["training.epochs", "'3'"]),
    ("negative width", {"model/base_width": -8}, ["model.base_width", "-8", "greater than 0"]),
    ("unknown schedule", {"diffusion/schedule": "cosinus"}, ["diffusion.schedule", "cosinus", "'linear'",
                                                             "'cosine'"]),
    ("unknown sampler", {"evaluation/sampler": "euler"}, ["evaluation.sampler", "euler", "'ddim'"]),
    ("empty sweep", {"sweep": {}}, ["sweep", "empty"]),
    ("empty sweep list", {"sweep": {"grid": {"model.base_width": []}}}, ["sweep.grid.model.base_width",
                                                                          "non-empty list"]),
    ("sweep of unknown field", {"sweep": {"grid": {"model.depth": [1, 2]}}}, ["model.depth", "allowed keys",
                                                                              "base_width"]),
    ("sweep of a non-section", {"sweep": {"grid": {"resources.workers_per_trial": [1, 2]}}},
     ["resources.workers_per_trial", "not a sweepable field"]),
    ("bad swept value", {"sweep": {"grid": {"model.base_width": [8, -16]}}}, ["model.base_width", "-16",
                                                                              "greater than 0"]),
    ("missing data root", {"data/root": "/nonexistent/mnist"}, ["data.root", "/nonexistent/mnist",
                                                                 "MNIST/raw", "STUDYCTL_DATA_ROOT"]),
    ("missing name", {"name": _DELETE}, ["name", "required"]),
    ("bad name", {"name": "my study!"}, ["name", "my study!"]),
    ("batch not divisible by workers", {"training/batch_size": 15}, ["training.batch_size", "15",
                                                                     "workers_per_trial=2"]),
    ("subset smaller than batch", {"data/subset_size": 8}, ["data.subset_size", "8", "batch"]),
    ("image size not halvable", {"data/image_size": 29}, ["image_size", "29"]),
    ("learning rate not positive", {"training/lr": 0}, ["training.lr", "0", "greater than 0"]),
    ("ema decay out of range", {"training/ema_decay": 1.5}, ["training.ema_decay", "1.5", "less than 1"]),
    ("ddim steps above T", {"evaluation/steps": 500}, ["evaluation.steps", "500", "1..diffusion.T=200"]),
    ("duplicate seeds", {"sweep": {"seeds": [0, 0]}}, ["sweep.seeds", "distinct"]),
    ("num_samples without random", {"sweep": {"grid": {"model.base_width": [8]}, "num_samples": 4}},
     ["sweep.num_samples", "sweep.random"]),
    ("negative gpu", {"resources/gpus_per_worker": -1}, ["resources.gpus_per_worker", "-1"]),
    ("DDP workers sharing a GPU", {"resources/gpus_per_worker": 0.5}, ["resources.gpus_per_worker", "0.5",
                                                                       "workers_per_trial: 1"]),
]


@pytest.mark.parametrize("kind,over,words", BAD, ids=[b[0] for b in BAD])
def test_bad_study_files_are_named(kind, over, words, data_root):
    d = tiny(data_root, **{k: v for k, v in over.items() if "/" in k or k == "name"})
    for k, v in over.items():
        if "/" not in k and k != "name":
            d[k] = v
    with pytest.raises(StudyError) as e:
        build_plan(parse_study(d))
    msg = str(e.value)
    for w in words:
        assert w in msg, f"{kind}: {w!r} not in message:\n{msg}"


def test_not_a_mapping_and_not_yaml(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("- just\n- a list\n")
    with pytest.raises(StudyError, match="mapping"):
        load_study_file(f)
    f.write_text("name: [unclosed\n")
    with pytest.raises(StudyError, match="not valid YAML"):
        load_study_file(f)
    with pytest.raises(StudyError, match="not found"):
        load_study_file(tmp_path / "missing.yaml")


def test_asha_early_stopping_is_optional_and_validated(data_root):
    d = tiny(data_root)
    d["sweep"]["asha"] = {"metric": "fid", "mode": "min", "grace_period": 2, "max_t": 10}
    spec = parse_study(d)
    assert spec.sweep.asha.metric == "fid" and spec.sweep.asha.reduction_factor == 2.0
    d["sweep"]["asha"] = {"metric": "accuracy"}
    with pytest.raises(StudyError, match="sweep.asha.metric"):
        parse_study(d)


# ------------------------------------------------------------------------ one schema
def test_study_file_defaults_are_the_core_defaults(data_root):
    """Every section of a study file is its diffusion_core dataclass: same keys, same defaults
    (a key left out of the file means what the core means without it)."""
    import dataclasses

    from pydantic import TypeAdapter

    from orchestrator.spec import DERIVED, SECTION_CLASSES, SECTION_TYPES

    spec = parse_study({"name": "defaults", "data": {"root": str(data_root)}})
    for section, core in SECTION_CLASSES.items():
        fields = [f.name for f in dataclasses.fields(core)]
        written = [k for k in fields if f"{section}.{k}" not in DERIVED]
        assert list(spec.sections()[section]) == written, section           # the file's keys are the fields
        from_file = TypeAdapter(SECTION_TYPES[section]).validate_python({})
        for name in fields:
            assert getattr(from_file, name) == getattr(core(), name), f"{section}.{name}"
            if section != "data":  # data.root: set above
                assert getattr(getattr(spec, section), name) == getattr(core(), name), f"{section}.{name}"


def test_moved_keys_name_their_new_place(data_root):
    d = tiny(data_root)
    d["evaluation"]["every"] = 10
    with pytest.raises(StudyError, match="'evaluation.every': unknown key .*it is now training.eval_every"):
        parse_study(d)
    d = tiny(data_root, **{"model/image_size": 32})
    with pytest.raises(StudyError, match="'model.image_size': set for each trial from data.image_size"):
        parse_study(d)
