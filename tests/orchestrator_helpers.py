"""Helpers for the orchestrator tests: tiny studies and `studyctl` run as a real subprocess.

Launches run in their own process group (a local Ray started by the launcher lives in
it), and every helper kills the whole group on the way out, so no Ray cluster outlives
a test even when it fails or times out.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
NAN_LR = 1e30  # Adam moves every weight by ~lr per step: activations overflow float32 within steps


def tiny_study(data_root, name: str = "tiny", **sections) -> dict:
    """A study that trains in seconds: tiny U-Net, 256 MNIST images, T=200, DDIM 5 steps, PNG figures."""
    d = {
        "name": name,
        "data": {"root": str(data_root), "subset_size": 256, "val_size": 128},
        "model": {"base_width": 8, "channel_mult": [1, 2], "blocks_per_level": 1, "bottleneck_blocks": 1},
        "diffusion": {"T": 200},
        "training": {"epochs": 2, "batch_size": 16, "lr": 1e-3, "ema_decay": 0.9, "log_every_first": 10,
                     "log_every": 5, "eval_every": 10, "eval_start": 10},
        "evaluation": {"n_samples": 32, "grid_images": 16, "sampler": "ddim",
                       "steps": 5, "t_grid": 6, "residual_images": 32, "is_splits": 2,
                       "interval_halves": 4},  # 4 random halves: the interval columns, at 1/12 of the 50 halves' cost
        "resources": {"workers_per_trial": 2, "cpus_per_worker": 1},
        # PNG only: a PDF of each figure cost the shared study ~9 s of its 26 s of drawing on an idle
        # 2-core CPU (PNG + PDF are written and checked in tests/test_study_figures.py)
        "analysis": {"figure_formats": ["png"]},
    }
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    return d


def write_study(path: Path, study: dict) -> Path:
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def env() -> dict:
    e = dict(os.environ)
    e.setdefault("RAY_DEDUP_LOGS", "0")
    e["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    e["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # no TensorBoard/CSV loggers: not our records
    e["PYTHONUNBUFFERED"] = "1"
    return e


def studyctl(*args, cwd=None, timeout: float = 400) -> subprocess.CompletedProcess:
    """Run `studyctl ARGS` to completion (in its own process group, killed on timeout)."""
    p = start(*args, cwd=cwd)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(p)
        out, _ = p.communicate()
        raise AssertionError(f"studyctl {' '.join(map(str, args))} timed out after {timeout} s:\n{out[-5000:]}")
    finally:
        kill_group(p)
    return subprocess.CompletedProcess(p.args, p.returncode, out, "")


def start(*args, cwd=None, log: Path | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "orchestrator.cli", *map(str, args)]
    return subprocess.Popen(cmd, cwd=cwd or REPO, env=env(), stdout=open(log, "w") if log else subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill_group(p: subprocess.Popen, sig=signal.SIGKILL) -> None:
    """Kill the launcher and everything it started (Ray's local processes share its group)."""
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    # Ray's processes may have left the group (setsid): end the ones this launcher started.
    _kill_ray_children_of_session(p.pid)


def _kill_ray_children_of_session(sid: int) -> None:
    """SIGKILL every process still in the launcher's session (it was started with a new session)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if os.getsid(int(entry)) == sid:
                os.kill(int(entry), signal.SIGKILL)
        except (ProcessLookupError, PermissionError, OSError):
            pass


def wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None, poll: float = 0.5):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = cond()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"launcher exited ({proc.returncode}) before: {what}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for: {what}")


def checkpoint_steps(out: Path, run: str) -> list[int]:
    """The steps of the checkpoints Ray Train has registered for `run` (a trial id, or a stacked
    group's name) in its snapshot, not ones still being uploaded."""
    from records.layout import ray_train_dir

    try:
        snap = json.loads((ray_train_dir(out) / run / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return []
    return sorted(int(c["checkpoint_dir_name"].rsplit("_", 1)[1]) for c in snap["checkpoint_results"])


def expected_steps(n_train: int, batch: int, world: int, epochs: int, first: int, every: int,
                   eval_every: int, eval_start: int):
    """(logged steps, epoch-end steps, evaluation steps) of diffusion_core.training.train for a config."""
    from diffusion_core.data import steps_per_epoch

    spe = steps_per_epoch(n_train, batch, world)
    total = spe * epochs
    logged = [s for s in range(1, total + 1) if s <= first or s % every == 0]
    ends = [spe * e for e in range(1, epochs + 1)]
    evals = sorted({s for s in range(1, total + 1) if s >= eval_start and s % eval_every == 0} | {total})
    return logged, ends, evals


def group_commands(pgid: int) -> list[str]:
    """The command lines of the live processes in process group `pgid` (Linux /proc)."""
    cmds = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:  # state, ppid, pgrp, ...
                cmds.append((stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, IndexError, ValueError):
            pass
    return cmds


@contextlib.contextmanager
def running_server(cmd: list[str], health_url: str, log_path: Path, timeout: float = 90, env_vars=None):
    """Start a server in its own process group, wait until `health_url` answers 200, stop it after."""
    log = open(log_path, "w")
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env_vars)
    try:
        t0 = time.time()
        while True:
            try:
                with urllib.request.urlopen(health_url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if p.poll() is not None or time.time() - t0 > timeout:
                raise AssertionError(f"{' '.join(cmd[1:4])} did not answer on {health_url}:\n"
                                     f"{Path(log_path).read_text()[-3000:]}")
            time.sleep(0.5)
        yield p
    finally:
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(p.pid, signal.SIGKILL)
        log.close()
