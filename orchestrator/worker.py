"""The Ray Train worker loop: `train_worker(config)` runs on each of a trial's DDP workers.

What a worker gets is a `TrialTask`: the trial's typed configs (plan.Trial), the writer of
its records and its MLflow run, built once by the trial's driver (driver.py).

It calls the same `diffusion_core.training.train` as the single-process path (DDP is already set
up by Ray's TorchTrainer: gloo on CPU, NCCL on GPU) and plugs in `TrialHooks`:

- rank 0 buffers the rows of each evaluation interval (losses, epochs), evaluates with
  EMA and raw weights at each evaluation step (Residual(t), sample grid, metrics), then
  writes the interval's Parquet parts, logs the same numbers to MLflow, saves the
  sample grid (PNG + .npy) and a small snapshot of the EMA and raw weights;
- then every rank reports a checkpoint (`ray.train.report` is a barrier: all ranks must
  call it): rank 0 contributes the full resume state, every rank its own RNG states,
  and Ray merges them into one checkpoint directory in the study's storage.

On (re)start, `ray.train.get_checkpoint()` gives the last checkpoint — after a worker
died (Ray restarts the group) or after `studyctl resume` (Ray Train restores a run of
the same name from storage). Rank 0 then deletes record parts after the restored step,
so the rows of the lost interval are written exactly once.

Without Ray (`studyctl launch --local`), `local_worker` runs the same loop in one process
with `LocalTrialHooks`: the full resume state goes to trial_files/<id>/resume.pt instead.

A diverged run (DivergedError: NaN/inf loss) is not retried — retrying a deterministic
divergence only burns time: every rank catches it (the loss is all-reduced, so all ranks
see it at the same step), rank 0's `on_diverged` hook writes the reason to `summary.json`, and
the trial driver marks the trial FAILED.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffusion_core.data import load_splits
from diffusion_core.evaluation import Evaluator, grid_image
from diffusion_core.training.engine import DivergedError, EpochLosses, TrainContext
from diffusion_core.training.train import train
from diffusion_core.training.validation import fixed_validation_draws, validation_loss
from diffusion_core.model.unet import count_parameters

from records.atomic import atomic_write, write_json
from records.layout import (checkpoint_config_file, checkpoint_name, checkpoint_rng_file, checkpoint_state_file,
                            eval_samples_file, progressive_file, resume_file, sample_grid_file,
                            snapshot_file, summary_file, train_indices_file, trial_files, worker_file)
from records.parquet import RecordWriter
from records.snapshots import save_snapshot

from . import tracking
from .plan import Trial

log = logging.getLogger(__name__)


def save_png(path: Path, grid_hwc: torch.Tensor) -> None:
    from PIL import Image

    arr = grid_hwc.numpy()
    if arr.shape[-1] == 1:
        arr = arr[..., 0]
    with atomic_write(path) as fh:
        Image.fromarray(arr).save(fh, format="PNG")


@dataclass(frozen=True)
class TrialTask:
    """Everything a worker needs to run one trial (pickled to each Ray Train worker)."""
    trial: Trial
    writer: RecordWriter             # the study folder, and the columns every record row of the trial carries
    mlflow_uri: str | None
    mlflow_run_id: str | None
    wall_before: float = 0.0         # wall seconds of earlier launches (summary.json keeps the total)
    driver_started_at: float = 0.0   # when this launch's driver started the trial

    @property
    def study_dir(self) -> Path:
        return self.writer.dir

    @property
    def files(self) -> Path:
        return trial_files(self.writer.dir, self.trial.trial_id)

    @property
    def resume_file(self) -> Path:
        return resume_file(self.writer.dir, self.trial.trial_id)


class TrialHooks:
    """diffusion_core TrainHooks for one trial (records on rank 0, checkpoints on every rank)."""

    def __init__(self, task: TrialTask, rank: int, restored_step: int, restarts: int):
        self.task, self.rank = task, rank
        self.trial = task.trial
        self.trial_id = self.trial.trial_id
        self.study_dir = task.study_dir
        self.files = task.files
        self.uri, self.run_id = task.mlflow_uri, task.mlflow_run_id
        self.eval_cfg = self.trial.evaluation
        self.restored_step, self.restarts = restored_step, restarts
        self.writer = task.writer
        self.rows: dict[str, list[dict]] = {"train_steps": [], "epochs": [], "residuals": [], "evals": []}
        self.metrics: list[tuple[str, float, int]] = []
        self.last_report: dict = {}
        self.t0 = time.time()
        self.evaluator: Evaluator | None = None
        self.val_draws = None  # fixed (t, eps) validation draws of the eval seed, made on first use
        self.mlflow_through = -1  # MLflow already holds every metric up to this step

    # ------------------------------------------------------------------ rank 0
    def on_start(self, ctx: TrainContext) -> None:
        self.ctx = ctx  # the live context (train() updates it in place); used if the run diverges
        removed = self.writer.drop_parts_after(self.restored_step)
        if removed:
            log.info("%s: restored at step %d, removed %d record parts written after it",
                     self.trial_id, self.restored_step, len(removed))
        if self.restored_step > 0 or self.restarts:
            # MLflow cannot delete points: after a restart from step S, the interval after S may
            # already be logged (flushed, but its checkpoint never landed). The replay from the
            # restored RNG state reproduces those values, so skip what MLflow already holds.
            self.mlflow_through = tracking.last_step(self.uri, self.run_id, "eval_seconds")
        self.parameters = count_parameters(ctx.model)
        if ctx.evaluator is None:
            raise ValueError(f"{self.trial_id}: TrialHooks evaluate with the run's evaluator; pass "
                             f"evaluation=trial.evaluation to train() (stacking.member does for train_stacked)")
        self.evaluator = ctx.evaluator  # built once by the engine (Evaluator.of_run)
        if ctx.splits.train_indices is not None:  # the subset by index, so analysis can rebuild it
            self.files.mkdir(parents=True, exist_ok=True)
            np.save(train_indices_file(self.study_dir, self.trial_id), ctx.splits.train_indices.cpu().numpy())
        self.write_summary(ctx, status="RUNNING")
        self.writer.write_trial(status="RUNNING", parameters=self.parameters, step=ctx.step,
                                total_steps=ctx.total_steps, restarts=self.restarts,
                                mlflow_run_id=self.run_id, updated_at=time.time())
        tracking.set_tags(self.uri, self.run_id, {"parameters": self.parameters,
                                                  "total_steps": ctx.total_steps})

    def on_step(self, ctx: TrainContext, loss: float, val_loss: float | None = None) -> None:
        self.rows["train_steps"].append({"step": ctx.step, "epoch": ctx.epoch, "loss": loss,
                                         "val_batch_loss": val_loss})
        self.metrics.append(("loss", loss, ctx.step))
        if val_loss is not None:  # training.val_loss_first (Fig. 26b)
            self.metrics.append(("val_batch_loss", val_loss, ctx.step))
        self.last_report["loss"] = loss

    def on_epoch(self, ctx: TrainContext, losses: EpochLosses) -> None:
        values = {"train_loss": losses.train, "val_loss": losses.val, "val_loss_raw": losses.val_raw,
                  "train_loss_eval": losses.train_eval, "ema_init_share": losses.ema_init_share}
        self.rows["epochs"].append({"epoch": losses.epoch, "step": ctx.step, **values})
        # ema_init_share goes to MLflow with the evaluations only (one point per step in its history)
        self.metrics += [(k, v, ctx.step) for k, v in values.items() if v is not None and k != "ema_init_share"]
        self.metrics.append(("epoch", losses.epoch, ctx.step))
        self.last_report.update(train_loss=losses.train, epoch=losses.epoch)
        if losses.val is not None:  # else on_eval measures it (training.val_every may skip this epoch)
            self.last_report.update(val_loss=losses.val, val_step=ctx.step)

    def on_eval(self, ctx: TrainContext) -> None:
        res = self.evaluator.evaluate(ctx.ema_model, ctx.model, samples=ctx.eval_samples)  # drawn by a stacked group
        step, epoch = ctx.step, ctx.epoch
        for weights, values in res.residuals.items():
            v = res.variance_interpolation.get(weights, [None] * len(values))
            for t, r, v_t in zip(res.t_grid, values, v):
                self.rows["residuals"].append({"step": step, "epoch": epoch, "t": t, "residual": r,
                                               "weights": weights, "variance_interpolation": v_t})
                self.metrics.append((f"residual_{weights}_t{t:04d}", r, step))
        png = sample_grid_file(self.study_dir, self.trial_id, step)
        save_png(png, grid_image(res.grid))
        np.save(png.with_suffix(".npy"), res.grid.numpy())  # rebuild Fig. 28 without MLflow
        if self.eval_cfg.keep_samples:  # `studyctl generalization` reads them instead of sampling again
            with atomic_write(eval_samples_file(self.study_dir, self.trial_id, step)) as fh:
                np.save(fh, res.samples.numpy())
        if step == ctx.total_steps:  # progressive generation of the final model (frames at evaluation.progressive_t)
            frames = self.evaluator.progressive(ctx.ema_model)
            if frames is not None:
                with atomic_write(progressive_file(self.study_dir, self.trial_id)) as fh:
                    np.savez(fh, t=np.asarray(frames[0]), frames=frames[1].numpy())
        n_img = self.eval_cfg.n_samples
        row = {"step": step, "epoch": epoch, "eval_seconds": res.seconds,
               "images_per_second": n_img / res.seconds if res.seconds > 0 else None,
               "sample_grid": str(png.relative_to(self.study_dir)), **res.metrics,
               "ema_init_share": ctx.state.ema.init_share}
        self.rows["evals"].append(row)
        self.metrics += [(k, v, step) for k, v in res.metrics.items()] + [("eval_seconds", res.seconds, step),
                                                                        ("ema_init_share", row["ema_init_share"], step)]
        self.last_report.update(step=step, **res.metrics)
        # Every report to Tune carries the metrics an ASHA scheduler may rank by, measured at
        # this evaluation: the EMA validation loss on the fixed draws (an evaluation need not
        # fall on an epoch end) and, before the first epoch ends, the latest logged loss.
        if self.last_report.get("val_step") != step:
            if self.val_draws is None:
                self.val_draws = fixed_validation_draws(ctx.splits.val, ctx.schedule, self.eval_cfg.seed)
            self.last_report["val_loss"] = validation_loss(ctx.ema_model, ctx.schedule, ctx.splits.val,
                                                           *self.val_draws)
        self.last_report.setdefault("train_loss", self.last_report.get("loss"))
        # EMA and raw weights (no optimizer state: small, for sampling and the ensemble
        # decomposition of both along training, `studyctl decompose`; like NVlabs/edm), with the
        # core configs that rebuild the model (records.snapshots)
        save_snapshot(snapshot_file(self.study_dir, self.trial_id, step), step=step,
                      ema=ctx.ema_model.state_dict(), raw=ctx.model.state_dict(), config=self.trial.config(),
                      data=self.trial.data, model=ctx.model.config,
                      schedule=self.trial.diffusion.schedule_config, evaluation=self.eval_cfg)
        # Records of this interval, before the checkpoint (see the module docstring).
        self.flush(step)
        # a replayed interval's image is already there (see on_start)
        tracking.log_sample_grid(self.uri, self.run_id, png, step, ctx.total_steps, image=step > self.mlflow_through)
        self.write_summary(ctx, status="RUNNING")

    def flush(self, step: int) -> None:
        for kind, rows in self.rows.items():
            self.writer.write_part(kind, rows, step)
            rows.clear()
        tracking.log_metrics(self.uri, self.run_id, [m for m in self.metrics if m[2] > self.mlflow_through])
        self.metrics = []

    def write_summary(self, ctx: TrainContext, status: str, error: str | None = None) -> None:
        # wall_seconds so far, across earlier launches: a killed launch keeps the time up to here.
        wall = self.task.wall_before + time.time() - (self.task.driver_started_at or self.t0)
        write_json(summary_file(self.study_dir, self.trial_id), {
            "trial_id": self.trial_id, "status": status, "error": error, "step": ctx.step,
            "total_steps": ctx.total_steps, "parameters": getattr(self, "parameters", None),
            "restarts": self.restarts, "wall_seconds": wall, "updated_at": time.time()})

    def on_diverged(self, err: DivergedError) -> None:
        ctx = self.ctx
        self.flush(ctx.step)  # keep the rows that show the divergence
        self.write_summary(ctx, status="FAILED", error=f"DivergedError: {err}")

    # ------------------------------------------------------------- every rank
    def on_eval_all_ranks(self, ctx: TrainContext) -> None:
        import ray.train

        tmp = Path(tempfile.mkdtemp(prefix=f"ckpt-{self.trial_id}-r{self.rank}-"))
        try:
            rng = {"generator": ctx.state.generator.get_state(), "cpu_rng": torch.get_rng_state()}
            if ctx.device.type == "cuda":
                rng["cuda_rng"] = torch.cuda.get_rng_state(ctx.device)
            torch.save(rng, checkpoint_rng_file(tmp, self.rank))
            if self.rank == 0:
                torch.save(ctx.state.state_dict(), checkpoint_state_file(tmp))
                checkpoint_config_file(tmp).write_text(json.dumps({"trial_id": self.trial_id, "config": self.trial.config(),
                                                             "step": ctx.step}, indent=1))
                metrics = {k: v for k, v in self.last_report.items() if v is not None}
                metrics.update(step=ctx.step, trial_id=self.trial_id)
            else:
                metrics = {"step": ctx.step}
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                             checkpoint_dir_name=checkpoint_name(ctx.step))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


class LocalTrialHooks(TrialHooks):
    """TrialHooks for a trial run in-process without Ray: the full resume state goes to one
    local file (replaced atomically at each evaluation, after that interval's records)."""

    def on_eval_all_ranks(self, ctx: TrainContext) -> None:
        with atomic_write(self.task.resume_file) as fh:
            torch.save(ctx.state.state_dict(), fh)

    @staticmethod
    def load_resume_file(path: Path) -> tuple[dict | None, int]:
        """(resume state, step) of a trial's resume file (layout.resume_file); (None, 0) before its first."""
        if not path.exists():
            return None, 0
        state = torch.load(path, weights_only=True, map_location="cpu")
        return state, int(state["step"])


def restore_from_ray_checkpoint(rank: int) -> tuple[dict | None, int]:
    """(resume_state, step) from Ray's latest checkpoint, with this rank's own RNG streams."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None, 0
    with ckpt.as_directory() as d:
        d = Path(d)
        state = torch.load(checkpoint_state_file(d), weights_only=True, map_location="cpu")
        rng_file = checkpoint_rng_file(d, rank)
        if rng_file.exists():  # each rank continues its own training-noise stream
            rng = torch.load(rng_file, weights_only=True)
            state["generator"], state["cpu_rng"] = rng["generator"], rng["cpu_rng"]
            state["cuda_rng"] = rng.get("cuda_rng")
    return state, int(state["step"])


def train_worker(config: dict) -> None:
    """Entry point of each Ray Train worker (TorchTrainer's train_loop_per_worker; config: {"task": TrialTask})."""
    import ray
    import ray.train
    import ray.train.torch

    task: TrialTask = config["task"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    write_json(worker_file(task.study_dir, task.trial.trial_id, rank),
               {"rank": rank, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "host": socket.gethostname(), "world_size": ctx.get_world_size()})
    resume_state, step = restore_from_ray_checkpoint(rank)
    run_trial_loop(task, rank, ray.train.torch.get_device(), resume_state, step, TrialHooks)


def local_worker(task: TrialTask, device: str | torch.device, progress: bool = True) -> None:
    """The same trial in this process, without Ray (`studyctl launch --local`): one worker,
    a progress bar, and the resume state in a local file instead of a Ray checkpoint."""
    write_local_worker_file(task, device)
    resume_state, step = LocalTrialHooks.load_resume_file(task.resume_file)
    run_trial_loop(task, 0, torch.device(device), resume_state, step, LocalTrialHooks, progress=progress)


def write_local_worker_file(task: TrialTask, device: str | torch.device) -> None:
    write_json(worker_file(task.study_dir, task.trial.trial_id, 0),
               {"rank": 0, "pid": os.getpid(), "node_id": "local", "host": socket.gethostname(), "world_size": 1,
                "device": str(device), "started_at": time.time()})


def restarts_so_far(task: TrialTask, resume_state: dict | None) -> int:
    """Restarts (worker-group restarts and resumes), counted across launches in summary.json."""
    try:
        before = json.loads(summary_file(task.study_dir, task.trial.trial_id).read_text())
    except (OSError, ValueError):
        before = {}
    return int(before.get("restarts") or 0) + (1 if resume_state is not None else 0)


def run_trial_loop(task: TrialTask, rank: int, device: torch.device, resume_state: dict | None, step: int,
                   hooks_class: type[TrialHooks], progress: bool = False) -> None:
    """diffusion_core.training.train on the trial's configs, with the trial's hooks (Ray worker or --local)."""
    trial = task.trial
    restarts = restarts_so_far(task, resume_state)
    splits = load_splits(trial.data)
    hooks = hooks_class(task, rank, step, restarts)
    try:
        train(data=trial.data, model=trial.model, diffusion=trial.diffusion, training=trial.training,
              eval_seed=trial.evaluation.seed, hooks=hooks, resume_state=resume_state, splits=splits,
              device=device, progress=progress, evaluation=trial.evaluation)
    except DivergedError as e:  # rank 0's hooks.on_diverged has recorded it (the engine calls it)
        log.error("trial %s diverged: %s", trial.trial_id, e)
