"""EMA snapshots: a trial's weights at one evaluation, with the core configs to rebuild it.

Each evaluation of a trial saves trial_files/<id>/ema/step_<step>.pt (layout.snapshot_file):

    {"step": int, "ema": state dict, "raw": state dict,
     "config": the trial's study config (the sections of the study file, for swept fields),
     "core": {"data": DataConfig, "model": UNetConfig, "schedule": ScheduleConfig,
              "evaluation": EvalConfig}   (each as dataclasses.asdict)}

Storing the diffusion_core configs themselves (not the study file's sections) is what lets
the readers (analysis/) rebuild a model with diffusion_core alone: no mapping from study
fields to core fields outside the orchestrator. Snapshots written before "core" existed
are read through `_core_of_study_config`, the mapping those studies used. Loaded with
weights_only=True: the file holds tensors and plain containers only.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusion_core.config import DataConfig, EvalConfig, ScheduleConfig, UNetConfig
from diffusion_core.model.unet import UNet

from .atomic import atomic_write

WEIGHTS = ("ema", "raw")


@dataclass
class Snapshot:
    step: int
    weights: dict[str, dict]      # "ema" (always), "raw" (snapshots since issue 9) -> state dict
    config: dict                  # the trial's study config: {"data": {...}, "model": {...}, ...}
    data: DataConfig
    model: UNetConfig
    schedule: ScheduleConfig
    evaluation: EvalConfig

    def net(self, weights: str = "ema", device: torch.device | str = "cpu") -> UNet:
        """The network with these weights, in eval mode (dropout off, as in Residual(t))."""
        net = UNet(self.model).to(device)
        net.load_state_dict(self.weights[weights])
        return net.eval()


def save_snapshot(path: str | os.PathLike, *, step: int, ema: dict, raw: dict, config: dict, data: DataConfig,
                  model: UNetConfig, schedule: ScheduleConfig, evaluation: EvalConfig) -> None:
    core = {name: dataclasses.asdict(c) for name, c in
            (("data", data), ("model", model), ("schedule", schedule), ("evaluation", evaluation))}
    with atomic_write(path) as fh:
        torch.save({"step": step, "ema": ema, "raw": raw, "config": config, "core": core}, fh)


def load_snapshot(path: str | os.PathLike, device: torch.device | str = "cpu") -> Snapshot:
    snap = torch.load(Path(path), map_location=device, weights_only=True)
    core = snap.get("core")
    if core is not None:
        configs = (DataConfig(**core["data"]), UNetConfig(**core["model"]), ScheduleConfig(**core["schedule"]),
                   EvalConfig(**core["evaluation"]))
    else:
        configs = _core_of_study_config(snap["config"])
    return Snapshot(int(snap["step"]), {w: snap[w] for w in WEIGHTS if w in snap}, snap["config"], *configs)


def _known(cls, section: dict, **fixed) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {**{k: v for k, v in section.items() if k in names}, **fixed}


def _core_of_study_config(cfg: dict) -> tuple[DataConfig, UNetConfig, ScheduleConfig, EvalConfig]:
    """Snapshots without "core": their study config sections -> the core configs, as the
    orchestrator mapped them when those snapshots were written."""
    d, m, f, e = cfg["data"], cfg["model"], cfg["diffusion"], cfg["evaluation"]
    mnist = d.get("dataset", "mnist") == "mnist"
    model = UNetConfig(**_known(UNetConfig, m, in_channels=1 if mnist else 3,
                                image_size=d.get("image_size") or (28 if mnist else 32),
                                channel_mult=tuple(m.get("channel_mult", (1, 2, 4))),
                                learn_sigma=f.get("reverse_variance") == "learned"))
    schedule = ScheduleConfig(**_known(ScheduleConfig, f, name=f.get("schedule", "linear")))
    t_grid = e.get("t_grid", EvalConfig.t_grid)
    evaluation = EvalConfig(**_known(EvalConfig, e, t_grid=t_grid if isinstance(t_grid, int) else tuple(t_grid),
                                     progressive_t=tuple(e.get("progressive_t", ()))))
    return DataConfig(**_known(DataConfig, d)), model, schedule, evaluation
