"""`resources.stack` under Ray (issue 11, orchestrator/ray_stacked.py).

Unit tests (no Ray): which Tune trials a launch or a resume makes of the unfinished trials, and
their names; which state a restarted group worker resumes from; ASHA refused with stacking.
End to end (below): one real Ray launch of a stacked group, its worker killed once.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal

import numpy as np
import pytest
import torch

from records.layout import ray_checkpoint_pointer

try:
    from .orchestrator_helpers import NAN_LR, kill_group, start, tiny_study, wait_for, write_study
except ImportError:
    from orchestrator_helpers import NAN_LR, kill_group, start, tiny_study, wait_for, write_study


def _plan(data_root, stack=2, **kw):
    from orchestrator.plan import build_plan
    from orchestrator.spec import parse_study

    return build_plan(parse_study(tiny_study(data_root, resources={"workers_per_trial": 1, "stack": stack},
                                             sweep={"seeds": [0, 1, 2]}, **kw)))


def _point(out, tid, run, step):
    """A member's pointer to its state in a group checkpoint, as GroupCheckpoint leaves it."""
    from records.layout import ray_train_dir

    state = ray_train_dir(out) / run / f"checkpoint_step_{step:09d}" / f"{tid}.pt"
    state.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": step, "who": tid}, state)
    (out / "trial_files" / tid).mkdir(parents=True, exist_ok=True)
    ray_checkpoint_pointer(out, tid).write_text(json.dumps(
        {"run": run, "step": step, "state": str(state.relative_to(out))}))


def test_tune_units_name_groups_by_their_members_and_resume_alone_when_steps_differ(data_root, tmp_path):
    from orchestrator.ray_stacked import Unit, group_name, tune_units
    from records.layout import ray_train_dir

    plan = _plan(data_root)
    a, b, c = plan.trials
    ids = [t.trial_id for t in plan.trials]
    said: list[str] = []
    units = tune_units(tmp_path, plan, ids, said.append)
    # stack_groups' groups (first fit, at most K = 2); the leftover trains alone as today
    assert units == [Unit(group_name([a, b]), (a, b), True), Unit(c.trial_id, (c,), False)]
    name = units[0].name
    assert name.startswith(f"{a.trial_id}+1-") and name == group_name([a, b])  # deterministic
    assert len({name, group_name([a]), group_name([a, c]), group_name([b, a])}) == 4  # membership decides
    assert tune_units(tmp_path, _plan(data_root, stack=1), ids, said.append) == [
        Unit(t.trial_id, (t,), False) for t in plan.trials]

    # resume: a at step 8 in the old group, b never checkpointed -> each alone, a from its pointer
    _point(tmp_path, a.trial_id, name, 8)
    units = tune_units(tmp_path, plan, ids, said.append)
    assert units == [Unit(group_name([a]), (a,), True), Unit(b.trial_id, (b,), False),
                     Unit(c.trial_id, (c,), False)]
    assert said == [f"trials {a.trial_id}, {b.trial_id} resume from different checkpoints: each runs alone"]
    # both at step 8: the same group, the same Ray Train run (its checkpoints are found again)
    _point(tmp_path, b.trial_id, name, 8)
    assert tune_units(tmp_path, plan, ids, said.append)[0] == Unit(name, (a, b), True)
    # a pointer whose checkpoint was deleted counts as none
    (ray_train_dir(tmp_path) / name / "checkpoint_step_000000008" / f"{b.trial_id}.pt").unlink()
    assert tune_units(tmp_path, plan, ids, said.append)[:2] == [Unit(group_name([a]), (a,), True),
                                                                Unit(b.trial_id, (b,), False)]
    # the groups of the unfinished trials only; one that trained alone under Ray stays alone
    assert tune_units(tmp_path, plan, [b.trial_id, c.trial_id], said.append) == [
        Unit(group_name([b, c]), (b, c), True)]
    (ray_train_dir(tmp_path) / c.trial_id).mkdir(parents=True)
    assert tune_units(tmp_path, plan, [b.trial_id, c.trial_id], said.append) == [
        Unit(b.trial_id, (b,), False), Unit(c.trial_id, (c,), False)]


class _Checkpoint:
    """ray.train.Checkpoint's as_directory, on a folder."""

    def __init__(self, d):
        self.d = d

    @contextlib.contextmanager
    def as_directory(self):
        yield str(self.d)


def test_a_restarted_group_resumes_from_rays_checkpoint_unless_it_lacks_a_member_or_is_older(tmp_path):
    from orchestrator.ray_stacked import restore_states

    out, ck = tmp_path / "study", tmp_path / "ckpt"
    ck.mkdir()
    (ck / "group.json").write_text(json.dumps({"run": "g", "step": 16, "members": ["a", "b"]}))
    for tid in ("a", "b"):
        torch.save({"step": 16, "who": tid}, ck / f"{tid}.pt")
    assert restore_states(out, ["a", "b"], None) == {"a": None, "b": None}
    assert restore_states(out, ["a", "b"], _Checkpoint(ck)) == {"a": {"step": 16, "who": "a"},
                                                                "b": {"step": 16, "who": "b"}}
    _point(out, "a", "old", 8)
    _point(out, "c", "old", 8)
    # c is not in Ray's checkpoint (another membership): every member from its pointer
    assert restore_states(out, ["a", "c"], _Checkpoint(ck)) == {"a": {"step": 8, "who": "a"},
                                                                "c": {"step": 8, "who": "c"}}
    _point(out, "b", "newer", 24)  # Ray's checkpoint is older than a member's pointer
    assert restore_states(out, ["a", "b"], _Checkpoint(ck))["b"] == {"step": 24, "who": "b"}


def test_a_worker_killed_between_its_pointers_resumes_every_member_from_the_newest_folder(tmp_path):
    """The kill lands after the report (the folder is complete in storage) and after member a's
    pointer, before b's and before Ray registered the checkpoint: both resume from that folder
    (b from the start would put the group's members at different steps)."""
    from orchestrator.ray_stacked import restore_states

    out = tmp_path / "study"
    _point(out, "a", "g", 8)
    folder = (out / json.loads(ray_checkpoint_pointer(out, "a").read_text())["state"]).parent
    torch.save({"step": 8, "who": "b"}, folder / "b.pt")
    assert restore_states(out, ["a", "b"], None) == {"a": {"step": 8, "who": "a"}, "b": None}  # no group.json yet
    (folder / "group.json").write_text(json.dumps({"run": "g", "step": 8, "members": ["a", "b"]}))
    assert restore_states(out, ["a", "b"], None) == {"a": {"step": 8, "who": "a"}, "b": {"step": 8, "who": "b"}}
    # Ray's registered checkpoint, older than the folder: the folder still wins
    ck = tmp_path / "ckpt"
    ck.mkdir()
    (ck / "group.json").write_text(json.dumps({"run": "g", "step": 4, "members": ["a", "b"]}))
    assert restore_states(out, ["a", "b"], _Checkpoint(ck))["b"] == {"step": 8, "who": "b"}


def test_asha_with_stacking_is_refused(data_root):
    from orchestrator.spec import StudyError, parse_study

    s = tiny_study(data_root, resources={"stack": 2}, sweep={"seeds": [0, 1], "asha": {"max_t": 4}})
    with pytest.raises(StudyError, match=r"field 'resources.stack': bad value 2: sweep.asha .* allowed: "
                                         r"resources.stack: 1 with sweep.asha"):
        parse_study(s)
    parse_study({**s, "resources": {"stack": 1}})


# ------------------------------------------------------------------------------ end to end
# One real Ray launch (the session's Ray cluster, real MNIST, SQLite MLflow) of a 3-member group: seeds 0 and 1
# and a member whose learning rate diverges. Its worker is killed after the group's first
# checkpoint (Ray Train restarts it from there), and its records are compared with the same
# study launched --local (same stacked core, in this process).
STEPS = list(range(1, 33))  # 128 images / batch 16 = 8 steps an epoch, 4 epochs, every step logged
EVALS = [8, 16, 24, 32]
RTOL = 1e-5  # measured bit-identical; allowed: the Ray worker (1 CPU thread) and this process may sum in other orders


def _e2e_study(data_root, name):
    return tiny_study(data_root, name=name, data={"subset_size": 128, "val_size": 128},
                      training={"epochs": 4, "log_every_first": 1000, "eval_every": 8, "eval_start": 8},
                      evaluation={"n_samples": 16, "grid_images": 16, "metrics": False},
                      resources={"workers_per_trial": 2, "cpus_per_worker": 1, "stack": 3, "max_failures": 1},
                      sweep={"arms": [{"training.seed": [0, 1]}, {"training.lr": [NAN_LR]}]},
                      analysis={"figures": False})


@pytest.fixture(scope="module")
def ray_group(tmp_path_factory, data_root, ray_cluster):
    from orchestrator.plan import build_plan
    from orchestrator.spec import parse_study
    from orchestrator.sweep import launch

    tmp = tmp_path_factory.mktemp("ray_stacked")
    local_plan = build_plan(parse_study(_e2e_study(data_root, "stacked")))
    assert launch(local_plan, tmp / "local", local=True, echo=lambda _: None) == 1
    out = tmp / "ray"
    p = start("launch", write_study(tmp / "study.yaml", _e2e_study(data_root, "stacked")), "--output", out,
              "--address", ray_cluster.address, log=tmp / "launch.log")
    try:
        seed0 = local_plan.trials[0].trial_id
        wait_for(lambda: ray_checkpoint_pointer(out, seed0).exists(), 240, "the group's first checkpoint",
                 p, poll=0.05)
        worker = json.loads((out / "trial_files" / seed0 / "workers" / "rank0.json").read_text())
        killed_after = json.loads(ray_checkpoint_pointer(out, seed0).read_text())
        os.kill(worker["pid"], signal.SIGKILL)
        code = p.wait(timeout=300)
    finally:
        kill_group(p)
    return {"local": tmp / "local", "ray": out, "code": code, "log": (tmp / "launch.log").read_text(),
            "plan": local_plan, "killed_after": killed_after}


def _table(d, kind):
    from records.parquet import read_table

    return read_table(d, kind).sort_values(["trial_id", "step"]).reset_index(drop=True)


@pytest.mark.slow
def test_a_stacked_group_under_ray_records_each_member_and_resumes_from_its_checkpoint(ray_group):
    from mlflow.tracking import MlflowClient

    from orchestrator.ray_stacked import group_name
    from records.layout import ray_train_dir
    from records.layout import snapshot_file

    out, local, plan = ray_group["ray"], ray_group["local"], ray_group["plan"]
    log = ray_group["log"]
    assert ray_group["code"] == 1, log[-3000:]
    assert "1 stacked group(s)" in log and "each stacked group trains in ONE Ray Train worker" in log
    ok, bad = [t.trial_id for t in plan.trials if t.training.lr != NAN_LR], \
        next(t.trial_id for t in plan.trials if t.training.lr == NAN_LR)
    trials = _table(out, "trials").set_index("trial_id")
    assert list(trials.loc[ok].status) == ["COMPLETED"] * 2 and trials.loc[ok].error.isna().all()
    assert trials.loc[bad].status == "FAILED" and trials.loc[bad].error.startswith("DivergedError: training loss")
    # the worker was killed once: the live members resumed from the group's checkpoint, the
    # diverged one stayed out; every logged step and evaluation is in the records exactly once
    assert ray_group["killed_after"]["step"] < EVALS[-1]
    assert list(trials.loc[ok].restarts) == [1, 1] and trials.loc[bad].restarts == 0
    ray_steps, local_steps = _table(out, "train_steps"), _table(local, "train_steps")
    assert ray_steps[["trial_id", "step"]].equals(local_steps[["trial_id", "step"]])
    for tid in ok:
        assert list(ray_steps[ray_steps.trial_id == tid].step) == STEPS
        assert list(_table(out, "evals").query("trial_id == @tid").step) == EVALS
    np.testing.assert_allclose(ray_steps.loss, local_steps.loss, rtol=RTOL)
    # one MLflow child run per member, with its metrics
    c = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()])
    children = {r.data.tags["studyctl.trial_id"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert sorted(children) == sorted(ok + [bad])
    assert children[bad].info.status == "FAILED" and children[bad].data.tags["error"].startswith("DivergedError")
    for tid in ok:
        assert children[tid].info.status == "FINISHED"
        history = sorted((m.step, m.value) for m in c.get_metric_history(children[tid].info.run_id, "loss"))
        assert [s for s, _ in history] == STEPS
        np.testing.assert_allclose([v for _, v in history], ray_steps[ray_steps.trial_id == tid].loss, rtol=1e-6)
    # one Ray Train run for the group; its last checkpoint holds each live member's state
    run = group_name(plan.trials)
    last = ray_train_dir(out) / run / f"checkpoint_step_{EVALS[-1]:09d}"
    assert json.loads((last / "group.json").read_text())["members"] == ok
    for tid in ok:
        state = torch.load(last / f"{tid}.pt", weights_only=True)
        snap = torch.load(snapshot_file(out, tid, EVALS[-1]), weights_only=False)
        assert state["step"] == EVALS[-1] and set(state) >= {"optimizer", "generator", "cpu_rng", "epoch_loss_sum"}
        for k, v in snap["raw"].items():
            assert torch.equal(state["model"][k], v), k
        for k, v in snap["ema"].items():
            assert torch.equal(state["ema"]["module"][k], v), k
        assert json.loads(ray_checkpoint_pointer(out, tid).read_text())["state"] == \
            str((last / f"{tid}.pt").relative_to(out))
    assert not ray_checkpoint_pointer(out, bad).exists()
