"""`resources.stack` (issue 11): a --local study whose trials train as one stacked model writes
each trial's records exactly as trials run one by one — the same Parquet rows and columns,
per-step losses equal to float tolerance (the stacked core's contract, tests/test_stacked.py:
~2e-7 relative measured, 1e-5 allowed), the same sample grids (drawn in the group's one batched
sampling pass; at most one uint8 level apart in 0.1% of pixels), its own MLflow child run, EMA
snapshots, resume file and summary — and a member that diverges is FAILED with its DivergedError while the other
completes. The stacked launch is interrupted and resumed on the way (each member from its
own resume file). Real MNIST, real Parquet, real MLflow (SQLite), in this process."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

try:
    from .orchestrator_helpers import NAN_LR, tiny_study
except ImportError:
    from orchestrator_helpers import NAN_LR, tiny_study

RTOL = 1e-5
LOGGED = list(range(1, 17))  # 128 images / batch 16 = 8 steps an epoch, 2 epochs, every step logged
EVALS = [8, 16]


def _plan(data_root, name: str, stack: int, sweep: dict, concurrent: int = 1):
    from orchestrator.plan import build_plan
    from orchestrator.spec import parse_study

    s = tiny_study(data_root, name=name, data={"subset_size": 128, "val_size": 128},
                   training={"log_every_first": 1000, "eval_every": 8, "eval_start": 8},
                   evaluation={"n_samples": 16, "grid_images": 16, "metrics": False},
                   resources={"workers_per_trial": 1, "stack": stack, "max_concurrent_trials": concurrent}, sweep=sweep, analysis={"figures": False})
    return build_plan(parse_study(s))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_root):
    """Three launches; the stacked one is interrupted (Ctrl-C) after its first evaluation's
    resume files, then resumed: the group resumes stacked from its members' files."""
    from orchestrator import worker
    from orchestrator.sweep import launch

    tmp = tmp_path_factory.mktemp("stacked")
    out = {}
    original = worker.LocalTrialHooks.on_eval_all_ranks

    def then_ctrl_c(self, ctx):  # after the last member's resume file of step 8
        original(self, ctx)
        if ctx.step == EVALS[0] and self.trial_id == last_id:
            raise KeyboardInterrupt

    for key, stack, sweep, concurrent in [
            ("alone", 1, {"seeds": [0, 1]}, 1), ("stacked", 2, {"seeds": [0, 1]}, 1),
            ("diverged", 2, {"grid": {"training.lr": [1e-3, NAN_LR]}}, 1),
            ("parallel", 2, {"seeds": [0, 1, 2]}, 2)]:   # groups (seeds 0+1) and (seed 2) in two processes
        said: list[str] = []
        plan = _plan(data_root, key, stack, sweep, concurrent)
        if key == "stacked":
            last_id = plan.trials[-1].trial_id
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(worker.LocalTrialHooks, "on_eval_all_ranks", then_ctrl_c)
                out["interrupted"] = launch(plan, tmp / key, local=True, echo=said.append)
        code = launch(plan, tmp / key, local=True, echo=said.append)
        out[key] = {"dir": tmp / key, "code": code, "said": said}
    return out


def _table(study_dir, kind):
    from records.parquet import read_table

    return read_table(study_dir, kind).drop(columns=["study"]).sort_values(["trial_id", "step"] + (
        ["weights", "t"] if kind == "residuals" else [])).reset_index(drop=True)


def _child_runs(study_dir):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{study_dir / 'mlflow.db'}")
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()])
    return c, {r.data.tags["studyctl.trial_id"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}


def test_stacked_trials_write_the_records_of_trials_run_alone(runs):
    alone, stacked = runs["alone"]["dir"], runs["stacked"]["dir"]
    assert runs["alone"]["code"] == runs["stacked"]["code"] == 0 and runs["interrupted"] == 130
    # one group, not two trials, in the interrupted launch and again when resumed
    assert sum("stacked on cpu" in line for line in runs["stacked"]["said"]) == 2
    assert not any("stacked on" in line for line in runs["alone"]["said"])
    trials = _table(stacked, "trials")
    assert list(trials.status) == ["COMPLETED"] * 2 and trials.error.isna().all()
    assert list(trials.columns) == list(_table(alone, "trials").columns)
    for kind in ("train_steps", "epochs", "evals", "residuals"):
        a, s = _table(alone, kind), _table(stacked, kind)
        assert list(a.columns) == list(s.columns), kind
        assert a[["trial_id", "step"]].equals(s[["trial_id", "step"]]), kind
    a, s = _table(alone, "train_steps"), _table(stacked, "train_steps")
    for tid in trials.trial_id:
        assert list(s[s.trial_id == tid].step) == LOGGED
    np.testing.assert_allclose(s.loss, a.loss, rtol=RTOL)
    assert abs(s.loss[s.trial_id == trials.trial_id[0]].values - s.loss[s.trial_id == trials.trial_id[1]].values
               ).max() > 1e-3  # two seeds: two different runs
    a, s = _table(alone, "epochs"), _table(stacked, "epochs")
    np.testing.assert_allclose(s.train_loss, a.train_loss, rtol=RTOL)
    np.testing.assert_allclose(s.val_loss, a.val_loss, rtol=RTOL)

    c, children = _child_runs(stacked)
    assert sorted(children) == list(trials.trial_id)
    for tid, run in children.items():
        assert run.info.status == "FINISHED" and run.data.tags["status"] == "COMPLETED"
        history = sorted((m.step, m.value) for m in c.get_metric_history(run.info.run_id, "loss"))
        assert [st for st, _ in history] == LOGGED
        np.testing.assert_allclose([v for _, v in history], s_steps(stacked, tid), rtol=1e-6)
        files = stacked / "trial_files" / tid
        summary = json.loads((files / "summary.json").read_text())
        assert summary["status"] == "COMPLETED" and summary["restarts"] == 1  # resumed once
        assert torch.load(files / "resume.pt", weights_only=True)["step"] == 16
        assert len(list((files / "ema").iterdir())) == len(EVALS)
        assert (files / "train_indices.npy").exists()
        for step in EVALS:  # the group's batched sampling pass gave each member the samples of its own run
            grid = f"samples/step_{step:09d}.npy"
            apart = np.abs(np.load(files / grid).astype(int) - np.load(alone / "trial_files" / tid / grid))
            assert apart.max() <= 1 and (apart > 0).mean() <= 1e-3, (tid, step)


def s_steps(study_dir, tid):
    t = _table(study_dir, "train_steps")
    return t[t.trial_id == tid].loss.values


def test_a_diverging_member_fails_alone(runs):
    d = runs["diverged"]["dir"]
    assert runs["diverged"]["code"] == 1
    trials = _table(d, "trials").set_index("training.lr")
    bad, ok = trials.loc[NAN_LR], trials.loc[1e-3]
    assert bad.status == "FAILED" and bad.error.startswith("DivergedError: training loss became")
    assert ok.status == "COMPLETED"
    # the survivor trained on as if alone: the seed-0 trial of the stack-1 study has its config
    alone = _table(runs["alone"]["dir"], "trials")
    np.testing.assert_allclose(s_steps(d, ok.trial_id), s_steps(runs["alone"]["dir"], alone.trial_id[0]), rtol=RTOL)
    _, children = _child_runs(d)
    assert children[bad.trial_id].info.status == "FAILED"
    assert children[bad.trial_id].data.tags["error"].startswith("DivergedError")
    assert children[ok.trial_id].info.status == "FINISHED"


def test_groups_are_stackable_trials_in_plan_order_at_most_k(data_root, tmp_path):
    """First fit in plan order: batch sizes 16 and 8 interleaved by the grid never share a group,
    a group holds at most K = 2, and `validate` prints the groups."""
    import yaml
    from typer.testing import CliRunner

    from orchestrator.cli import app
    from orchestrator.plan import build_plan
    from orchestrator.spec import parse_study
    from orchestrator.stacking import stack_groups

    s = tiny_study(data_root, resources={"workers_per_trial": 1, "stack": 2},
                   sweep={"grid": {"training.seed": [0, 1, 2], "training.batch_size": [16, 8]}})
    plan = build_plan(parse_study(s))
    groups = [[(t.training.seed, t.training.batch_size) for t in g] for g in stack_groups(plan)]
    assert groups == [[(0, 16), (1, 16)], [(0, 8), (1, 8)], [(2, 16)], [(2, 8)]]
    assert stack_groups(build_plan(parse_study({**s, "resources": {"stack": 1}}))) == [[t] for t in plan.trials]
    f = tmp_path / "study.yaml"
    f.write_text(yaml.safe_dump(s))
    r = CliRunner().invoke(app, ["validate", str(f)])
    assert r.exit_code == 0 and "resources.stack=2: 2 stacked group(s), 2 trial(s) alone" in r.output, r.output


def test_groups_run_side_by_side_in_processes(runs):
    """max_concurrent_trials groups at a time, each in its own process: the stacked pair writes
    what the trials run alone write, the group of one trains alone."""
    p = runs["parallel"]
    assert p["code"] == 0 and any("2 group(s), 2 at a time in separate processes" in x for x in p["said"])
    trials = _table(p["dir"], "trials")
    assert list(trials.status) == ["COMPLETED"] * 3
    alone = _table(runs["alone"]["dir"], "train_steps")
    s = _table(p["dir"], "train_steps")
    by_seed = dict(zip(trials["training.seed"], trials.trial_id))
    alone_by_seed = dict(zip(_table(runs["alone"]["dir"], "trials")["training.seed"],
                             _table(runs["alone"]["dir"], "trials").trial_id))
    for seed in (0, 1):
        np.testing.assert_allclose(s[s.trial_id == by_seed[seed]].loss.values,
                                   alone[alone.trial_id == alone_by_seed[seed]].loss.values, rtol=RTOL)
    assert list(s[s.trial_id == by_seed[2]].step) == LOGGED
