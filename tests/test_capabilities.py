"""Every config field is honoured or refused on every execution path (issue 23, item 2).

diffusion_core.capabilities.SUPPORT has an entry for every field of the five core configs; a path
it names for a field refuses some values of it, a path it does not name honours every value. Here:
- the entries cover every field, exactly (a new field without one fails; DataConfig's are automatic);
- every (field, path) pair is walked: where the table says refused, the path's own check refuses an
  example value naming the field -- train() for one process and under DDP, check_stackable for a
  stacked group, build_plan for a study's local / Ray / Ray DDP trials, stack_groups (the trial then
  trains alone, and `validate`'s grouping says why) for a stacked study; where it says honoured, the
  path accepts the field (a refusal would name it).
What "honoured" does is pinned elsewhere: a stacked member equals its lone run (test_stacked*.py,
test_pinned_curve.py, and below for device_noise and the raw weights' losses), the speed options keep
the loss curve (test_fast_path.py, test_no_host_step.py).
"""
from __future__ import annotations

import dataclasses

import pytest

from diffusion_core import DataConfig, DiffusionConfig, TrainConfig, UNetConfig, train
from diffusion_core.capabilities import ENGINE_PATHS, SUPPORT, Member, check_stackable, refusals
from diffusion_core.config import EvalConfig
from diffusion_core.training.train import TrialConfigs

try:
    from .orchestrator_helpers import tiny_study
except ImportError:
    from orchestrator_helpers import tiny_study

TINY = UNetConfig(base_width=8, channel_mult=(1, 2), blocks_per_level=1)
CLASSES = {"data": DataConfig, "model": UNetConfig, "diffusion": DiffusionConfig, "training": TrainConfig,
           "evaluation": EvalConfig}
LEARNED = {"diffusion": {"reverse_variance": "learned", "loss": "hybrid"}, "model": {"learn_sigma": True}}
# A value of each refused field that its refusing paths refuse (with what else it needs to be valid).
REFUSED_EXAMPLES = {
    "model.learn_sigma": LEARNED,
    "model.class_conditional": {"model": {"class_conditional": True}},
    "diffusion.loss": LEARNED,
    "training.precision": {"training": {"precision": "bf16"}},
    "training.channels_last": {"training": {"channels_last": True}},
    "training.compile": {"training": {"compile": True}},
    "training.fused_adam": {"training": {"fused_adam": True}},
    "training.cuda_graph": {"training": {"cuda_graph": True}},
    "training.val_loss_first": {"training": {"val_loss_first": 10}, "diffusion": {"loss": "elbo"}},
}


def configs(**changes) -> TrialConfigs:
    base = {"data": DataConfig(), "model": TINY, "diffusion": DiffusionConfig(), "training": TrainConfig(max_steps=1)}
    return TrialConfigs(**{s: dataclasses.replace(c, **changes.get(s, {})) for s, c in base.items()})


def fields():
    return [(s, f.name) for s, cls in CLASSES.items() for f in dataclasses.fields(cls)]


def test_every_config_field_has_exactly_one_entry():
    for section, cls in CLASSES.items():
        assert set(SUPPORT[section]) == {f.name for f in dataclasses.fields(cls)}, \
            f"{cls.__name__}: fields without an entry in capabilities.SUPPORT (or entries without a field)"
    for (section, name) in fields():
        assert set(SUPPORT[section][name]) <= set(ENGINE_PATHS), f"{section}.{name}: unknown path"
    refused = {f"{s}.{n}" for s, n in fields() if SUPPORT[s][n]}
    assert refused == set(REFUSED_EXAMPLES), "each refused field needs an example value here"


def test_a_new_data_field_is_honoured_everywhere_without_an_entry():
    assert all(SUPPORT["data"][f.name] == {} for f in dataclasses.fields(DataConfig))


def engine_check(path: str, cfg: TrialConfigs, monkeypatch) -> None:
    """The real check of an engine path: train() alone or under DDP (world size faked: the check comes
    before any collective), check_stackable of a group member."""
    if path == "stacked":
        check_stackable([Member(cfg.training, cfg.model, cfg.data, cfg.diffusion, name="m")])
        return
    import diffusion_core.training.train as train_module

    monkeypatch.setattr(train_module, "rank_and_world", lambda: (0, 2) if path == "ddp" else (0, 1))
    sentinel = RuntimeError("passed the path check")

    def stop(_):  # the first thing after the check: no data, no training
        raise sentinel
    monkeypatch.setattr(train_module, "pick_device", stop)
    try:
        train(data=cfg.data, model=cfg.model, diffusion=cfg.diffusion, training=cfg.training)
    except RuntimeError as e:
        if e is not sentinel:
            raise


@pytest.mark.parametrize("path", ENGINE_PATHS)
def test_every_field_is_honoured_or_refused_by_the_engine(path, monkeypatch):
    for section, name in fields():
        dotted = f"{section}.{name}"
        refusal = SUPPORT[section][name].get(path)
        if refusal is None:
            assert dotted not in [f for f, _ in refusals(path, configs())]
            continue
        cfg = configs(**REFUSED_EXAMPLES[dotted])
        with pytest.raises(ValueError, match=rf"{dotted}=.* is not supported .*allowed: "):
            engine_check(path, cfg, monkeypatch)
    engine_check(path, configs(), monkeypatch)  # the defaults pass every path


def study_with(data_root, example: dict, **sections) -> dict:
    d = tiny_study(data_root, **sections)
    for section, values in example.items():
        d[section] = {**d.get(section, {}), **{k: v for k, v in values.items() if k != "learn_sigma"}}
    return d


@pytest.mark.parametrize("execution_path", ["local", "ray", "ray_ddp", "stacked"])
def test_every_field_is_honoured_or_refused_by_a_study(execution_path, data_root):
    """build_plan refuses a trial whose local / Ray / Ray DDP path cannot honour a field, naming it; a
    stacked study trains such a trial alone and says why."""
    from orchestrator.plan import EXECUTION_PATHS, build_plan
    from orchestrator.spec import StudyError, parse_study
    from orchestrator.stacking import describe, stack_groups

    engine = EXECUTION_PATHS[execution_path]
    resources = {"workers_per_trial": 2 if execution_path == "ray_ddp" else 1,
                 "stack": 2 if execution_path == "stacked" else 1}
    for dotted, example in REFUSED_EXAMPLES.items():
        section, name = dotted.split(".")
        study = study_with(data_root, example, resources=resources, sweep={"seeds": [0, 1]})
        refused = engine in SUPPORT[section][name]
        # every study's trials are checked on the local path first (build_plan): a field no path can
        # honour is refused there, whatever the study's own path
        on_local = "alone" in SUPPORT[section][name]
        if on_local or (refused and execution_path != "stacked"):
            first = "local" if on_local else execution_path
            with pytest.raises(StudyError, match=rf"field '{dotted}': {dotted}=.*allowed: .*execution path "
                                                 rf"'{first}'"):
                build_plan(parse_study(study))
            continue
        plan = build_plan(parse_study(study))
        if execution_path == "stacked":
            groups = stack_groups(plan)
            assert len(groups) == (2 if refused else 1), dotted
            if refused:
                assert f"{dotted}=" in describe(groups, 2)
    # the ray / local paths differ only in what the DDP path adds
    assert {EXECUTION_PATHS[p] for p in ("local", "ray")} == {"alone"}


def test_ddp_refusal_message_says_what_to_change(data_root):
    from orchestrator.plan import build_plan
    from orchestrator.spec import StudyError, parse_study

    with pytest.raises(StudyError) as err:
        build_plan(parse_study(tiny_study(data_root, training={"cuda_graph": True})))
    assert ("field 'training.cuda_graph': training.cuda_graph=True is not supported under DDP (world size > 1) "
            "(one CUDA graph replays one process's step; DDP all-reduces inside it); allowed: False "
            "(or resources.workers_per_trial: 1); execution path 'ray_ddp'") in str(err.value)



def test_fields_read_only_with_another_are_noted_when_unused(data_root):
    """compile_mode without compile, label_dropout without a class-conditional model: honoured where they
    apply, and `validate` notes a trial where they cannot (never silently dropped)."""
    from orchestrator.plan import build_plan
    from orchestrator.spec import parse_study

    plan = build_plan(parse_study(tiny_study(data_root, training={"compile_mode": "max-autotune",
                                                                  "label_dropout": 0.2})))
    notes = plan.notes()
    assert any("training.compile_mode='max-autotune' is unused (training.compile is false)" in n for n in notes)
    assert any("training.label_dropout=0.2 is unused (model.class_conditional is false)" in n for n in notes)
    assert build_plan(parse_study(tiny_study(data_root))).notes() == []
