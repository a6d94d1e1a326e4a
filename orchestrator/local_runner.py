"""The trials without Ray (`studyctl launch --local`): one after another in this process
(with a progress bar), or `resources.max_concurrent_trials` at a time in as many processes
sharing the device (packed trials: `benchmarks/bench_packing.py` measures what that buys).
Each resumes from its own trial_files/<id>/resume.pt, and a failed trial does not stop the
others. Same records and MLflow runs as a Ray launch; one worker per trial. With
`resources.stack: K`, up to K trials that can share a model train together as one stacked
model in one process (stacked_worker.py), `resources.max_concurrent_trials` groups at a time."""
from __future__ import annotations

from typing import Callable

from records.layout import resume_file

from .driver import SetupError, StudyRun, TrialFailed, drive_group, drive_trial


def local_device(gpus_per_worker: float) -> str:
    """Where `--local` trains: the first GPU if the study asks for GPUs, else the CPU."""
    import torch

    if gpus_per_worker > 0:
        if not torch.cuda.is_available():
            raise SetupError(f"resources.gpus_per_worker is {gpus_per_worker:g} but torch sees no "
                             f"CUDA device here: set it to 0 to train on the CPU, or run on a GPU machine")
        return "cuda"
    return "cpu"


def run_local(study: StudyRun, todo: list[str], device: str, echo: Callable[[str], None]) -> None:
    """The trials `todo` (ids), or their stacked groups (resources.stack > 1, orchestrator/stacking.py),
    one after another in this process, or `resources.max_concurrent_trials` at a time in as many
    processes (resources.cpus_per_worker threads each)."""
    r = study.plan.spec.resources
    if r.workers_per_trial > 1:
        echo(f"--local: one process per trial (resources.workers_per_trial={r.workers_per_trial} "
             f"applies to Ray runs); the global batch is unchanged")
    if r.stack > 1:
        from .stacking import stack_groups

        groups = [[t.trial_id for t in g] for g in stack_groups(study.plan, todo)]
    else:
        groups = [[tid] for tid in todo]
    name = lambda ids: f"trials {', '.join(ids)}" if len(ids) > 1 else f"trial {ids[0]}"  # noqa: E731
    k = min(r.max_concurrent_trials or 1, len(groups))
    if k == 1:
        for n, ids in enumerate(groups, 1):
            echo(f"[{n}/{len(groups)}] {name(ids)}{' stacked' if len(ids) > 1 else ''} on {device}")
            for line in local_group(study, ids, device):
                echo(line)
        return
    import concurrent.futures as cf
    import multiprocessing as mp

    threads = max(1, int(r.cpus_per_worker))
    what = f"{len(groups)} group(s)" if r.stack > 1 else f"{len(groups)} trials"
    echo(f"{what}, {k} at a time in separate processes on {device} ({threads} CPU thread(s) each)")
    with cf.ProcessPoolExecutor(max_workers=k, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(local_group, study, ids, device, threads): ids for ids in groups}
        for n, fut in enumerate(cf.as_completed(futures), 1):
            ids = futures[fut]
            try:
                lines = fut.result()
            except Exception as e:  # the process died (killed, out of memory): marked INTERRUPTED after the sweep
                lines = [f"{name(ids)}: process died ({type(e).__name__}: {e})"]
            echo(f"[{n}/{len(groups)}] {name(ids)} ended" + "".join(f"\n  {x}" for x in lines))


def local_trial(study: StudyRun, trial_id: str, device: str, threads: int | None = None) -> str | None:
    """One trial in this process; returns the failure message, None if it completed. With
    `threads` (packed trials) it trains on that many CPU threads, without a progress bar."""
    from .worker import local_worker

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    try:
        drive_trial(study, study.plan.trial(trial_id),
                    lambda task: local_worker(task, device, progress=threads is None))
    except TrialFailed as e:
        return str(e)
    return None


def local_group(study: StudyRun, trial_ids: list[str], device: str, threads: int | None = None) -> list[str]:
    """One group of stack_groups in this process: stacked, or its trials alone when it has one
    member or its members' resume files are at different steps. Returns what to tell the user
    (failures). With `threads` (a process of a pool) it trains on that many CPU threads."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    lines = []
    if len(trial_ids) > 1:
        from .stacked_worker import resume_steps, stacked_worker

        if len(resume_steps(resume_file(study.out, t) for t in trial_ids)) > 1:
            lines.append(f"trials {', '.join(trial_ids)} resume from different steps: each runs alone")
        else:
            errors = drive_group(study, [study.plan.trial(t) for t in trial_ids],
                                 lambda tasks: stacked_worker(tasks, device))
            return [f"trial {tid} failed: {error}" for tid, error in zip(trial_ids, errors) if error]
    for tid in trial_ids:
        error = local_trial(study, tid, device, threads)
        if error:
            lines.append(error)
    return lines
