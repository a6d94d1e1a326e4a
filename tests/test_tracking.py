"""What a study logs to MLflow, and under which names: a real SQLite store, no Ray, no training."""
from __future__ import annotations

import math

import pytest

from orchestrator import tracking


@pytest.fixture
def store(tmp_path):
    uri = tracking.default_uri(tmp_path)
    exp = tracking.ensure_experiment(uri, "s", tmp_path)
    parent = tracking.ensure_parent_run(uri, exp, "s", tmp_path)
    return uri, exp, parent


def test_a_metric_that_does_not_apply_is_not_logged(store):
    """An unconditional model's conditional_accuracy / fid_class_mean are NaN in the records:
    MLflow gets no such key (it would draw an empty chart); an infinite value is still logged
    (MLflow stores it as the largest float)."""
    uri, exp, parent = store
    run = tracking.ensure_child_run(uri, exp, parent, "s", "t000-abc", {})
    tracking.log_metrics(uri, run, [("fid", 3.5, 10), ("conditional_accuracy", float("nan"), 10),
                                    ("fid_class_mean", math.nan, 10), ("recall", None, 10),
                                    ("eval_seconds", math.inf, 10)])
    logged = tracking.client(uri).get_run(run).data.metrics
    assert set(logged) == {"compare/fid", "eval_seconds"} and logged["compare/fid"] == 3.5
    tracking.log_metrics(uri, run, [("fid_class_mean", math.nan, 20)])  # nothing left to log: no call
    assert tracking.client(uri).get_run(run).data.metrics == logged


def test_mlflow_keys_put_the_comparison_first():
    """The chart view sorts sections by the key's prefix and puts un-prefixed keys last."""
    k = tracking.mlflow_key
    assert [k(n) for n in ("val_loss", "fid", "inception_score", "precision", "recall")] == [
        "compare/val_loss", "compare/fid", "compare/inception_score", "compare/precision", "compare/recall"]
    assert k("fid_cov_term") == "eval/fid_cov_term" and k("real_fid") == "real_data/fid"
    assert k("residual_ema_t0001") == "residual_ema/t0001" and k("residual_raw_t1000") == "residual_raw/t1000"
    assert [k(n) for n in ("loss", "train_loss", "eval_seconds", "wall_seconds")] == [
        "loss", "train_loss", "eval_seconds", "wall_seconds"]
    sections = sorted({k(n).rpartition("/")[0] for n in ("fid", "h_y", "real_fid", "residual_ema_t0001",
                                                          "residual_raw_t0001")})
    assert sections[0] == "compare"
    # resume reads the last logged evaluation back under the same key
    assert tracking.last_step(None, "r", "val_loss") == -1


def test_a_trial_run_is_named_by_its_swept_values_and_renamed_on_resume(store):
    uri, exp, parent = store
    run = tracking.ensure_child_run(uri, exp, parent, "s", "t001-abc", {}, run_name="t001 base_width=16")
    c = tracking.client(uri)
    assert c.get_run(run).info.run_name == "t001 base_width=16"
    tracking.end_run(uri, run, "KILLED")
    again = tracking.ensure_child_run(uri, exp, parent, "s", "t001-abc", {}, run_name="t001 base_width=16 seed=0")
    assert again == run
    assert c.get_run(run).info.run_name == "t001 base_width=16 seed=0" and c.get_run(run).info.status == "RUNNING"
    assert tracking.ensure_child_run(uri, exp, parent, "s", "t002-def", {}) and \
        c.search_runs([exp], "tags.`studyctl.trial_id` = 't002-def'")[0].info.run_name == "t002-def"


def test_plan_label_names_the_swept_values(data_root):
    from orchestrator.plan import build_plan
    from orchestrator.spec import StudySpec

    try:
        from .orchestrator_helpers import tiny_study
    except ImportError:
        from orchestrator_helpers import tiny_study
    study = tiny_study(data_root, sweep={"grid": {"model.base_width": [8, 16], "diffusion.schedule": ["linear",
                                                                                                    "cosine"]},
                                         "seeds": [0, 1]})
    plan = build_plan(StudySpec.model_validate(study))
    labels = [plan.label(t.trial_id) for t in plan.trials]
    assert len(set(labels)) == len(labels) == 8
    t = plan.trials[5]
    assert plan.label(t.trial_id) == (f"t005 schedule={t.diffusion.schedule} base_width={t.model.base_width} "
                                      f"seed={t.training.seed}")
    one = build_plan(StudySpec.model_validate(tiny_study(data_root)))
    assert one.label(one.trials[0].trial_id) == one.trials[0].trial_id  # nothing swept: the id


def test_the_run_description_shows_the_latest_sample_grid(store, tmp_path):
    """The run page opens on its description: it links the latest grid, which the artifact store holds."""
    from PIL import Image

    uri, exp, parent = store
    run = tracking.ensure_child_run(uri, exp, parent, "s", "t000-abc", {})
    for step in (10, 20):
        png = tmp_path / f"step_{step:09d}.png"
        Image.new("L", (32, 32), color=step).save(png)
        tracking.log_sample_grid(uri, run, png, step, 20, image=step == 10)
    c = tracking.client(uri)
    note = c.get_run(run).data.tags["mlflow.note.content"]
    assert note.startswith(f"![sample grid at step 20](get-artifact?path=samples/step_000000020.png&run_uuid={run})")
    assert "step 20 of 20" in note
    assert sorted(a.path for a in c.list_artifacts(run, "samples")) == [
        "samples/step_000000010.png", "samples/step_000000020.png"]
    images = [a.path for a in c.list_artifacts(run, "images")]
    assert len(images) == 2 and all("sample_grid+step+10+" in p for p in images)  # the image and its thumbnail
