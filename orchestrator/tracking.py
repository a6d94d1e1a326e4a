"""MLflow: one parent run per study, one child run per trial.

Default store: `sqlite:///<study>/mlflow.db` with artifacts in `<study>/mlartifacts`
(the experiment's artifact location), so a study folder is self-contained and
`studyctl ui <study>` (or `mlflow ui --backend-store-uri sqlite:///.../mlflow.db`) shows
it. Any tracking URI works, including an `mlflow server`.

Runs are found again by tags, not by remembering ids in a process: the parent by
(`studyctl.study`, `studyctl.output`), a child by (`studyctl.parent`, `studyctl.trial_id`).
That is what makes a resumed trial continue its child run instead of starting a second
one. Only the launcher and rank 0 of each trial talk to MLflow.

With `tracking.enabled: false` the uri is None and every call here is a no-op.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from records.layout import mlflow_artifacts, mlflow_db

log = logging.getLogger(__name__)

MAX_BATCH = 900  # MLflow accepts up to 1,000 metrics per log_batch
# MLflow's chart view puts metrics in sections named by the key's prefix before "/" (the chart's
# title is the rest), the sections sorted by name and the un-prefixed metrics last ("Model
# metrics"). So the numbers that compare trials open the view ("compare/"), then the evaluation's
# other numbers, the real-data references at the same sample count and Residual(t) one chart per
# t; the losses along training, the timings and the sample grid stay un-prefixed. Only MLflow's
# keys change: the Parquet columns keep the plain names.
COMPARE_KEYS = ("val_loss", "fid", "inception_score", "precision", "recall", "conditional_accuracy")
EVAL_KEYS = ("fid_mean_term", "fid_cov_term", "inception_score_std", "h_y", "h_y_given_x", "memorized_fraction",
             "fid_class_mean")
# Tell the MLflow 3 UI an experiment is model training (runs table, charts), not GenAI traces.
# The 3.x UI also keeps a global GenAI / model-training switch (default GenAI) that overrides
# the tag: `experiment_url` asks for model training in the URL (workflowType=machine_learning).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def _needs_store(off_value=None):
    """A tracking call with uri None (tracking.enabled: false) does nothing and returns off_value:
    callers need not know whether MLflow is on."""
    def wrap(fn):
        @functools.wraps(fn)
        def call(uri, *args, **kw):
            return off_value if uri is None else fn(uri, *args, **kw)
        return call
    return wrap


def default_uri(study_dir: str | os.PathLike) -> str:
    return f"sqlite:///{mlflow_db(Path(study_dir).resolve())}"


def tracking_uri(spec_uri: str | None, study_dir: str | os.PathLike) -> str:
    return spec_uri or default_uri(study_dir)


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _retry(fn, *args, tries: int = 5, **kw):
    """SQLite stores raise 'database is locked' under concurrent writers: back off and retry."""
    for i in range(tries):
        try:
            return fn(*args, **kw)
        except Exception as e:  # noqa: BLE001 - MlflowException wraps the OperationalError
            if i == tries - 1 or "locked" not in str(e).lower():
                raise
            time.sleep(0.5 * 2 ** i)


@_needs_store()
def ensure_experiment(uri: str, name: str, study_dir: str | os.PathLike) -> str:
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.tags.get(EXPERIMENT_KIND_TAG) is None:  # made by an older studyctl
            _retry(c.set_experiment_tag, exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
        # A local store keeps artifacts beside it; a server decides its own location.
        artifact_location = mlflow_artifacts(Path(study_dir).resolve()).as_uri()
    return _retry(c.create_experiment, name, artifact_location=artifact_location,
                  tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


def _find(c, exp_id: str, filter_string: str):
    runs = c.search_runs([exp_id], filter_string=filter_string, max_results=5, order_by=["attributes.start_time ASC"])
    return runs[0] if runs else None


@_needs_store()
def ensure_parent_run(uri: str, exp_id: str, study: str, study_dir: str | os.PathLike,
                      params: dict[str, Any] | None = None) -> str:
    c = client(uri)
    out = str(Path(study_dir).resolve())
    run = _find(c, exp_id, f"tags.`studyctl.study` = '{study}' and tags.`studyctl.output` = '{out}' "
                           f"and tags.`studyctl.role` = 'study'")
    if run is not None:
        if run.info.status != "RUNNING":
            _retry(c.update_run, run.info.run_id, status="RUNNING")
        return run.info.run_id
    run = _retry(c.create_run, exp_id, run_name=study,
                 tags={"studyctl.study": study, "studyctl.output": out, "studyctl.role": "study"})
    if params:
        log_params(uri, run.info.run_id, params)
    return run.info.run_id


@_needs_store()
def ensure_child_run(uri: str, exp_id: str, parent_id: str, study: str, trial_id: str,
                     params: dict[str, Any], run_name: str | None = None) -> str:
    """The trial's child run: found by tags if an earlier launch created it (resume), else created.
    run_name (default: the trial id) is what the UI's tables and chart legends show: the trial's
    swept values (Plan.label); a resumed run gets it too."""
    c = client(uri)
    run_name = run_name or trial_id
    run = _find(c, exp_id, f"tags.`studyctl.parent` = '{parent_id}' and tags.`studyctl.trial_id` = '{trial_id}'")
    if run is not None:
        if run.info.status != "RUNNING" or run.info.run_name != run_name:
            _retry(c.update_run, run.info.run_id, status="RUNNING", name=run_name)
        return run.info.run_id
    run = _retry(c.create_run, exp_id, run_name=run_name,
                 tags={"mlflow.parentRunId": parent_id, "studyctl.parent": parent_id, "studyctl.study": study,
                       "studyctl.trial_id": trial_id, "studyctl.role": "trial"})
    log_params(uri, run.info.run_id, params)
    return run.info.run_id


@_needs_store()
def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    c = client(uri)
    for lo in range(0, len(items), 90):  # 100 params per batch at most
        _retry(c.log_batch, run_id, params=items[lo:lo + 90])


def mlflow_key(name: str) -> str:
    """The MLflow key of a recorded metric: val_loss -> compare/val_loss, residual_ema_t0001 ->
    residual_ema/t0001, real_fid -> real_data/fid, loss -> loss (see COMPARE_KEYS)."""
    if name in COMPARE_KEYS:
        return f"compare/{name}"
    if name in EVAL_KEYS:
        return f"eval/{name}"
    if name.startswith("real_"):
        return f"real_data/{name[len('real_'):]}"
    if name.startswith("residual_"):
        weights, t = name[len("residual_"):].split("_", 1)
        return f"residual_{weights}/{t}"
    return name


@_needs_store()
def log_metrics(uri: str, run_id: str, metrics: list[tuple[str, float, int]]) -> None:
    """[(name, value, step)] in batches, under their MLflow keys (mlflow_key). A NaN (or None) is a metric that does not apply — an
    unconditional model's conditional_accuracy / fid_class_mean — and is not logged: MLflow would
    draw it as an empty chart. The Parquet records keep it (NaN). A diverged loss never gets here
    (train() raises first); an infinite value is logged as is."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(mlflow_key(k), float(v), now, int(s)) for k, v, s in metrics
             if v is not None and not math.isnan(v)]
    if not items:
        return
    c = client(uri)
    for lo in range(0, len(items), MAX_BATCH):
        _retry(c.log_batch, run_id, metrics=items[lo:lo + MAX_BATCH])


@_needs_store(-1)
def last_step(uri: str, run_id: str, name: str) -> int:
    """The largest step logged for the metric `name` in the run (-1 if none)."""
    hist = client(uri).get_metric_history(run_id, mlflow_key(name))
    return max((m.step for m in hist), default=-1)


@_needs_store()
def log_artifact(uri: str, run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
    try:
        if Path(path).is_dir():  # the folder's contents under artifact_path (not artifact_path/<name>)
            client(uri).log_artifacts(run_id, str(path), artifact_path)
        else:
            client(uri).log_artifact(run_id, str(path), artifact_path)
    except Exception as e:  # an artifact upload failure must not fail the trial: the file is on disk
        log.warning("could not log artifact %s to MLflow run %s: %s", path, run_id, e)


@_needs_store()
def log_image(uri: str, run_id: str, png: str | os.PathLike, key: str, step: int) -> None:
    """An image per step (MLflow >= 2.12): the run page's charts show it with a step slider,
    where an artifact would sit in a folder tree."""
    try:
        from PIL import Image

        with Image.open(png) as im:
            client(uri).log_image(run_id, im.copy(), key=key, step=int(step), synchronous=True)
    except Exception as e:  # like log_artifact: the grid is on disk whatever MLflow says
        log.warning("could not log image %s to MLflow run %s: %s", png, run_id, e)


@_needs_store()
def log_sample_grid(uri: str, run_id: str, png: str | os.PathLike, step: int, total_steps: int,
                    image: bool = True) -> None:
    """An evaluation's sample grid, three ways: the PNG under the run's artifacts (samples/), an
    image per step for the charts (image=False: a replayed step's image is already there), and
    the run's description, which the run page shows first, holding the latest grid."""
    name = Path(png).name
    log_artifact(uri, run_id, png, "samples")
    if image:
        log_image(uri, run_id, png, "sample_grid", step)
    # A relative link to the server's artifact endpoint: the UI renders the description's markdown.
    note = (f"![sample grid at step {step}](get-artifact?path=samples/{name}&run_uuid={run_id})\n\n"
            f"The sample grid at step {step} of {total_steps} (EMA weights, the evaluation's fixed noise). "
            f"Every evaluation's grid: the `sample_grid` chart (Model metrics, with a step slider) and "
            f"Artifacts > samples.")
    set_tags(uri, run_id, {"mlflow.note.content": note})


@_needs_store()
def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    c = client(uri)
    for k, v in tags.items():
        _retry(c.set_tag, run_id, k, str(v)[:5000])


@_needs_store()
def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """status: FINISHED | FAILED | KILLED."""
    _retry(client(uri).set_terminated, run_id, status)


def study_store(study_dir: str | os.PathLike) -> tuple[dict, str | None] | None:
    """(study snapshot, its tracking uri — None when tracking is off) of a study folder;
    None if the folder holds no study.yaml."""
    from records.layout import read_study_file

    snap = read_study_file(study_dir)
    if snap is None:
        return None
    t = snap.get("tracking") or {}
    return snap, (tracking_uri(t.get("uri"), study_dir) if t.get("enabled", True) else None)


def experiment_url(base: str, experiment_id: str) -> str:
    """The MLflow UI page that compares a study's trials: its experiment as model training (the
    3.x UI otherwise opens on GenAI traces), in the chart view, the trials only (the study's
    parent run holds no metrics and would sit in every legend; clearing the filter shows it),
    listed flat in trial order (the UI folds child runs under their parent only when sorted by
    start time). The chart view draws the first 10 runs of the list; its eye icons pick others."""
    from urllib.parse import urlencode

    query = urlencode({"workflowType": "machine_learning", "compareRunsMode": "CHART",
                       "searchFilter": "tags.`studyctl.role` = 'trial'",
                       "orderByKey": "tags.`mlflow.runName`", "orderByAsc": "true"})
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def study_experiment_id(study_dir: str | os.PathLike) -> str | None:
    """The MLflow experiment id of a study folder's own store (None without one)."""
    found = study_store(study_dir)
    if found is None or found[1] is None:
        return None
    snap, uri = found
    exp = client(uri).get_experiment_by_name((snap.get("tracking") or {}).get("experiment") or snap["name"])
    return exp.experiment_id if exp is not None else None


def find_parent_run(study_dir: str | os.PathLike) -> tuple[str, str] | None:
    """(tracking uri, parent run id) of the study that wrote `study_dir`, without touching the run."""
    d = Path(study_dir).resolve()
    found = study_store(d)
    if found is None or found[1] is None:
        return None
    snap, uri = found
    c = client(uri)
    exp = c.get_experiment_by_name((snap.get("tracking") or {}).get("experiment") or snap["name"])
    if exp is None:
        return None
    run = _find(c, exp.experiment_id, f"tags.`studyctl.study` = '{snap['name']}' and "
                                      f"tags.`studyctl.output` = '{d}' and tags.`studyctl.role` = 'study'")
    return (uri, run.info.run_id) if run is not None else None
