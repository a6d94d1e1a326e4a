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
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_BATCH = 900  # MLflow accepts up to 1,000 metrics per log_batch
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
    return f"sqlite:///{Path(study_dir).resolve() / 'mlflow.db'}"


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
        artifact_location = (Path(study_dir).resolve() / "mlartifacts").as_uri()
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
                     params: dict[str, Any]) -> str:
    """The trial's child run: found by tags if an earlier launch created it (resume), else created."""
    c = client(uri)
    run = _find(c, exp_id, f"tags.`studyctl.parent` = '{parent_id}' and tags.`studyctl.trial_id` = '{trial_id}'")
    if run is not None:
        if run.info.status != "RUNNING":
            _retry(c.update_run, run.info.run_id, status="RUNNING")
        return run.info.run_id
    run = _retry(c.create_run, exp_id, run_name=trial_id,
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


@_needs_store()
def log_metrics(uri: str, run_id: str, metrics: list[tuple[str, float, int]]) -> None:
    """[(key, value, step)] in batches; non-finite values are logged as MLflow stores them."""
    if not metrics:
        return
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, int(s)) for k, v, s in metrics]
    c = client(uri)
    for lo in range(0, len(items), MAX_BATCH):
        _retry(c.log_batch, run_id, metrics=items[lo:lo + MAX_BATCH])


@_needs_store(-1)
def last_step(uri: str, run_id: str, key: str) -> int:
    """The largest step logged for `key` in the run (-1 if none)."""
    hist = client(uri).get_metric_history(run_id, key)
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
    """The MLflow UI page of an experiment's runs as model training, trials listed flat: the UI
    nests child runs (collapsed) under their parent only when sorted by start time."""
    from urllib.parse import urlencode

    query = urlencode({"workflowType": "machine_learning", "orderByKey": "tags.`mlflow.runName`",
                       "orderByAsc": "true"})
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
