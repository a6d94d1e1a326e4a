"""Malformed study inputs, each refused by `studyctl validate` with exit 2 and a message naming
the field (and what is allowed): the shipped table of test_orchestrator_spec plus the values the
schema accepted but every trial then failed on or silently changed. No training, no Ray."""
from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli import app

try:
    from .test_orchestrator_spec import BAD, tiny
except ImportError:
    from test_orchestrator_spec import BAD, tiny

# (kind, changes as in test_orchestrator_spec.BAD, words the message must contain)
DOOMED = [
    ("subset beyond the split", {"data/subset_size": 50000}, ["data.subset_size", "50000", "1..48000"]),
    ("val_size beyond the split", {"data/val_size": 20000}, ["data.val_size", "20000", "1..12000"]),
    ("disjoint subset index beyond the split", {"data/subset_size": 2000, "data/subset_index": 30},
     ["data.subset_index", "30", "0..23"]),
    ("subset index without a subset", {"data/subset_size": None, "data/subset_index": 2}, ["data.subset_index"]),
    ("image smaller than MNIST", {"data/image_size": 16}, ["data.image_size", "16", ">= 28"]),
    ("beta_start above beta_end", {"diffusion/beta_start": 0.03}, ["diffusion.beta_start", "0.03",
                                                                   "beta_start <= beta_end"]),
    ("one residual timestep", {"evaluation/t_grid": 1}, ["evaluation.t_grid", "2..diffusion.T=200"]),
    ("more residual timesteps than T", {"evaluation/t_grid": 500}, ["evaluation.t_grid", "500"]),
    ("residual timestep above T", {"evaluation/t_grid": [1, 300]}, ["evaluation.t_grid", "300", "1..diffusion.T"]),
    ("repeated residual timestep", {"evaluation/t_grid": [5, 5]}, ["evaluation.t_grid", "distinct"]),
    ("adam beta above 1", {"training/adam_betas": [0.9, 1.5]}, ["training.adam_betas", "1.5", "less than 1"]),
    ("negative adam beta", {"training/adam_betas": [-0.1, 0.9]}, ["training.adam_betas", "-0.1"]),
    ("adam betas not a pair", {"training/adam_betas": [0.9]}, ["training.adam_betas"]),
    ("more IS splits than samples allow", {"evaluation/is_splits": 10}, ["evaluation.is_splits", "10", "1..8"]),
    ("attention heads not dividing channels", {"model/attention": True, "model/attention_heads": 3},
     ["model.attention_heads", "3", "16 channels", "1, 2, 4, 8, 16"]),
    ("residual images beyond val_size", {"evaluation/residual_images": 500}, ["evaluation.residual_images", "500",
                                                                              "1..128"]),
    ("swept subset beyond the split", {"sweep": {"grid": {"data.subset_size": [256, 60000]}}},
     ["data.subset_size", "60000"]),
    ("swept beta_end below beta_start", {"sweep": {"grid": {"diffusion.beta_end": [0.02, 1e-5]}}},
     ["diffusion.beta_start", "beta_end"]),
    ("dropout of 1", {"model/dropout": 1.0}, ["model.dropout", "less than 1"]),
    ("T of 1", {"diffusion/T": 1}, ["diffusion.T", "greater than or equal to 2"]),
    ("unknown dataset", {"data/dataset": "imagenet"}, ["data.dataset", "imagenet", "'mnist'"]),
    ("unknown subset mode", {"data/subset_mode": "random"}, ["data.subset_mode", "'bootstrap'"]),
    ("unknown precision", {"training/precision": "fp16"}, ["training.precision", "'bf16'"]),
    ("no levels", {"model/channel_mult": []}, ["model.channel_mult"]),
    ("negative eta", {"evaluation/eta": -1}, ["evaluation.eta", "-1"]),
    ("zero checkpoints kept", {"resources/keep_checkpoints": 0}, ["resources.keep_checkpoints", "0"]),
    ("unknown reverse variance", {"diffusion/reverse_variance": "sigma"}, ["diffusion.reverse_variance",
                                                                            "'beta_tilde'"]),
    ("unknown placement", {"resources/placement_strategy": "RANDOM"}, ["resources.placement_strategy", "'PACK'"]),
    ("negative max_failures", {"resources/max_failures": -1}, ["resources.max_failures", "-1"]),
    ("zero trials per stack", {"resources/stack": 0}, ["resources.stack", "0", "greater than 0"]),
    ("tracking flag as a word", {"tracking/enabled": "yes"}, ["tracking.enabled", "'yes'"]),
    ("zero decomposition points", {"analysis/decompose_points": 0}, ["analysis.decompose_points", "0"]),
    ("figures without their PNG", {"analysis/figure_formats": ["pdf"]}, ["analysis.figure_formats", "['pdf']",
                                                                        "allowed:", "includes png"]),
    ("a figure format twice", {"analysis/figure_formats": ["png", "png"]}, ["analysis.figure_formats", "distinct"]),
    ("unknown figure format", {"analysis/figure_formats": ["png", "jpg"]}, ["analysis.figure_formats", "'jpg'",
                                                                           "'svg'"]),
    ("unknown ASHA metric", {"sweep": {"grid": {"model.base_width": [8, 16]}, "asha": {"metric": "accuracy"}}},
     ["sweep.asha.metric", "accuracy"]),
    ("a swept value that is not a list", {"sweep": {"grid": {"model.base_width": 8}}},
     ["sweep.grid.model.base_width"]),
    ("an empty arm", {"sweep": {"arms": [{}]}}, ["sweep.arms.0"]),
    ("unknown key lists the section's keys", {"training/lrr": 1e-3}, ["training.lrr", "unknown key", "lr, adam_betas"]),
    # Width 1: one channel per GroupNorm group erases the time embedding (unet.py); it trained, blind to t.
    ("one channel wide", {"model/base_width": 1}, ["model.base_width", "=1", "allowed: an integer >= 2", "GroupNorm"]),
    ("one channel wide, swept", {"sweep": {"grid": {"model.base_width": [8, 1]}}}, ["model.base_width", ">= 2"]),
    # A billion samples: `launch` died allocating the starting noise (3.1 TB), naming no field.
    ("a billion samples", {"evaluation/n_samples": 10 ** 9}, ["evaluation.n_samples", "1000000000",
                                                             "allowed: 1..1217394", "GiB"]),
    ("a grid beyond memory", {"evaluation/grid_images": 2 * 10 ** 6}, ["evaluation.grid_images", "1..1217394"]),
    ("samples beyond memory in a stacked group", {"evaluation/n_samples": 400_000, "resources/stack": 4},
     ["evaluation.n_samples", "400000", "resources.stack", "1..304348"]),
    ("timestep 0 and beyond T", {"evaluation/t_grid": [0, 100, 2000]}, ["evaluation.t_grid", "[0, 100, 2000]",
                                                                         "1..diffusion.T=200"]),
    ("timesteps not integers", {"evaluation/t_grid": "abc"}, ["evaluation.t_grid", "'abc'",
                                                              "a count n in 2..diffusion.T"]),
]
TABLE = [(kind, over, words, None, None) for kind, over, words in BAD + DOOMED]

# Inputs that are not a change of the tiny study dict: raw YAML text, or --set arguments.
RAW = [
    ("duplicate key", "name: dup\ntraining:\n  lr: 1.0e-3\n  epochs: 1\n  lr: 2.0e-3\n", [], ["'lr'", "twice",
                                                                                            "lines 3 and 5"]),
    ("duplicate section", "name: dup\ntraining: {epochs: 1}\ntraining: {epochs: 2}\n", [], ["'training'", "twice"]),
    ("not a mapping", "- just\n- a list\n", [], ["mapping"]),
    ("not YAML", "name: [unclosed\n", [], ["not valid YAML"]),
    ("--set of an unknown key", None, ["--set", "training.lrr=1"], ["training.lrr", "allowed keys here", "epochs"]),
    ("--set of an unknown section", None, ["--set", "trainig.lr=1"], ["trainig", "allowed keys here", "training"]),
    ("--set without a value", None, ["--set", "training.epochs"], ["training.epochs", "FIELD=VALUE"]),
    ("--set with bad YAML", None, ["--set", "training.epochs=[1"], ["training.epochs", "not valid YAML"]),
    ("--set into a value", None, ["--set", "name.first=x"], ["name", "not a section"]),
    ("--set of a bad swept value", None, ["--set", "sweep.grid.model.base_width=[8, -1]"],
     ["model.base_width", "-1", "greater than 0"]),
]
TABLE += [(kind, None, words, text, args) for kind, text, args, words in RAW]


def _study_dict(data_root, over: dict) -> dict:
    d = tiny(data_root, **{k: v for k, v in over.items() if "/" in k or k == "name"})
    for k, v in over.items():
        if "/" not in k and k != "name":
            d[k] = v
    return d


@pytest.mark.parametrize("kind,over,words,text,args", TABLE, ids=[t[0] for t in TABLE])
def test_validate_refuses_with_exit_2_naming_the_field(kind, over, words, text, args, data_root, tmp_path):
    f = tmp_path / "study.yaml"
    if text is not None:
        f.write_text(text)
    else:
        f.write_text(yaml.safe_dump(_study_dict(data_root, over or {}), sort_keys=False))
    r = CliRunner().invoke(app, ["validate", str(f), *(args or [])])
    assert r.exit_code == 2, f"{kind}: exit {r.exit_code}\n{r.output}"
    for w in words:
        assert w in r.output, f"{kind}: {w!r} not in message:\n{r.output}"
    assert "constrained-" not in r.output, f"{kind}: pydantic's internal type names leak:\n{r.output}"


def test_the_table_tries_at_least_50_inputs():
    assert len(TABLE) >= 50


def test_set_reaches_a_dotted_sweep_field(data_root, tmp_path):
    """`--set sweep.grid.model.base_width=[8]`: sweep.grid is the container, model.base_width the key."""
    f = tmp_path / "study.yaml"
    f.write_text(yaml.safe_dump(tiny(data_root)))
    r = CliRunner().invoke(app, ["validate", str(f), "--set", "sweep.grid.model.base_width=[8, 12, 16]",
                                 "--set", "sweep.grid.training.lr=[1.0e-3]"])
    assert r.exit_code == 0, r.output
    assert "3 trial(s)" in r.output


def test_launch_refuses_a_trial_bigger_than_the_cluster_before_writing(data_root, tmp_path, monkeypatch):
    """workers_per_trial x cpus_per_worker beyond the cluster: refused before any record or MLflow
    run exists (Ray stubbed to a 2-CPU cluster: this is the check, not Ray)."""
    import ray

    from orchestrator import ray_runner, sweep
    from orchestrator.driver import SetupError
    from orchestrator.plan import build_plan
    from orchestrator.spec import parse_study

    monkeypatch.setattr(ray_runner, "init_ray", lambda address: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    d = tiny(data_root)
    for extra in ({}, {"max_concurrent_trials": 1}):
        d["resources"] = {"workers_per_trial": 4, "cpus_per_worker": 1, **extra}
        out = tmp_path / "out"
        with pytest.raises(SetupError, match=r"one trial needs 4 x \(CPU 1.0"):
            sweep.launch(build_plan(parse_study(d)), out)
        assert not out.exists()
