"""`resources.stack` under Ray (issue 11, orchestrator/ray_stacked.py).

Unit tests (no Ray): which Tune trials a launch or a resume makes of the unfinished trials, and
their names; which state a restarted group worker resumes from; ASHA refused with stacking.
"""
from __future__ import annotations

import contextlib
import json

import pytest
import torch

try:
    from .orchestrator_helpers import tiny_study
except ImportError:
    from orchestrator_helpers import tiny_study


def _plan(data_root, stack=2, **kw):
    from orchestrator.plan import build_plan
    from orchestrator.spec import parse_study

    return build_plan(parse_study(tiny_study(data_root, resources={"workers_per_trial": 1, "stack": stack},
                                             sweep={"seeds": [0, 1, 2]}, **kw)))


def _point(out, tid, run, step):
    """A member's pointer to its state in a group checkpoint, as GroupCheckpoint leaves it."""
    from orchestrator.ray_stacked import POINTER, train_storage

    state = train_storage(out) / run / f"checkpoint_step_{step:09d}" / f"{tid}.pt"
    state.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": step, "who": tid}, state)
    (out / "trial_files" / tid).mkdir(parents=True, exist_ok=True)
    (out / "trial_files" / tid / POINTER).write_text(json.dumps(
        {"run": run, "step": step, "state": str(state.relative_to(out))}))


def test_tune_units_name_groups_by_their_members_and_resume_alone_when_steps_differ(data_root, tmp_path):
    from orchestrator.ray_stacked import Unit, group_name, train_storage, tune_units

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
    (train_storage(tmp_path) / name / "checkpoint_step_000000008" / f"{b.trial_id}.pt").unlink()
    assert tune_units(tmp_path, plan, ids, said.append)[:2] == [Unit(group_name([a]), (a,), True),
                                                                Unit(b.trial_id, (b,), False)]
    # the groups of the unfinished trials only; one that trained alone under Ray stays alone
    assert tune_units(tmp_path, plan, [b.trial_id, c.trial_id], said.append) == [
        Unit(group_name([b, c]), (b, c), True)]
    (train_storage(tmp_path) / c.trial_id).mkdir(parents=True)
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


def test_asha_with_stacking_is_refused(data_root):
    from orchestrator.spec import StudyError, parse_study

    s = tiny_study(data_root, resources={"stack": 2}, sweep={"seeds": [0, 1], "asha": {"max_t": 4}})
    with pytest.raises(StudyError, match=r"field 'resources.stack': bad value 2: sweep.asha .* allowed: "
                                         r"resources.stack: 1 with sweep.asha"):
        parse_study(s)
    parse_study({**s, "resources": {"stack": 1}})
