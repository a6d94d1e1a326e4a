"""Which trials a study figure may average, and how it says so.

A study figure plots one swept field (the x axis, or one curve per value). Every other
swept field except the seed defines a *group*: one curve or panel per group, so trials
that differ in anything but their seed are never pooled (a width-32 point must not mix
schedules, training-set sizes or subsets). Within a group the seeds are replicates:
each point is their mean with a two-sided 95% Student-t interval,
mean +- t_{0.975, n-1} s / sqrt(n), s the sample standard deviation over the n seeds
(no interval when n = 1); the legend states n. The interval is symmetric, so with few seeds
(n = 2: t = 12.7) it can reach values the quantity cannot take (an FID of -1,000): `summarize`
cuts it to the quantity's range (QUANTITY_RANGE), which keeps its 95% coverage (the true value
lies in the range) and says where it cut.

Per-timestep curves of different schedules are compared at equal noise level, not equal t:
their x axis is the log signal-to-noise ratio lambda_t = log(alpha_bar_t / (1 - alpha_bar_t))
(Kingma et al. 2021, "Variational Diffusion Models"), computed from each trial's schedule.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Iterator

import numpy as np
import pandas as pd

REPLICATE_FIELD = "training.seed"
SCHEDULE_FIELDS = ("diffusion.schedule", "diffusion.T", "diffusion.beta_start", "diffusion.beta_end")


# The values each plotted quantity can take (a column of the evals / epochs / residuals tables).
# FID and its terms are squared distances; IS over C = 10 classes lies in [1, C], its entropies in
# [0, ln C]; fractions in [0, 1]; losses and residuals are mean squared errors.
_NONNEGATIVE = (0.0, math.inf)
_FRACTION = (0.0, 1.0)
QUANTITY_RANGE: dict[str, tuple[float, float]] = {
    **dict.fromkeys(("fid", "fid_mean_term", "fid_cov_term", "fid_class_mean", "real_fid"), _NONNEGATIVE),
    **dict.fromkeys(("inception_score", "inception_score_arith", "real_inception_score"), (1.0, 10.0)),
    **dict.fromkeys(("h_y", "h_y_given_x"), (0.0, math.log(10))),
    **dict.fromkeys(("precision", "recall", "memorized_fraction", "conditional_accuracy", "real_precision",
                     "real_recall", "real_memorized_fraction"), _FRACTION),
    **dict.fromkeys(("loss", "train_loss", "train_loss_eval", "val_loss", "val_loss_raw", "residual"), _NONNEGATIVE),
    "same_noise_cosine": (-1.0, 1.0),
}


def range_text(y: str) -> str:
    """'[0, inf)' for a quantity of QUANTITY_RANGE."""
    lo, hi = QUANTITY_RANGE[y]
    return f"[{lo:g}, {'∞)' if hi == math.inf else f'{hi:.3g}]'}"


def group_fields(swept: list[str], plotted: str) -> list[str]:
    """The fields whose values define a group: every swept field but the plotted one and the seed."""
    return [c for c in swept if c not in (plotted, REPLICATE_FIELD)]


def t_interval(values) -> tuple[float, float, float, int]:
    """(mean, low, high, n) of the finite values; a 95% Student-t interval (low = high = mean if n = 1)."""
    from scipy.stats import t as student_t

    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    n = len(v)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = float(v.mean())
    if n == 1:
        return mean, mean, mean, 1
    half = float(student_t.ppf(0.975, n - 1) * v.std(ddof=1) / math.sqrt(n))
    return mean, mean - half, mean + half, n


def summarize(df: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Per x value: mean, low, high, n of y over the rows (the seeds of one group), and `cut`: whether
    the t-interval left y's range (QUANTITY_RANGE) and [low, high] is its part inside the range."""
    rows = [(xv, *t_interval(g[y].to_numpy())) for xv, g in df.dropna(subset=[y]).groupby(x)]
    s = pd.DataFrame(rows, columns=[x, "mean", "low", "high", "n"]).sort_values(x).reset_index(drop=True)
    lo, hi = QUANTITY_RANGE.get(y, (-math.inf, math.inf))
    s["cut"] = (s["low"] < lo) | (s["high"] > hi)
    s["low"], s["high"] = s["low"].clip(lower=lo), s["high"].clip(upper=hi)
    return s


def _sort_key(value):
    return (0, value, "") if isinstance(value, (int, float, np.number)) and not pd.isna(value) else (1, 0, str(value))


def groups(df: pd.DataFrame, fields: list[str]) -> Iterator[tuple[dict, pd.DataFrame]]:
    """({field: value}, rows) for each distinct combination of `fields` (missing values included), sorted."""
    if not fields:
        yield {}, df
        return
    parts = list(df.groupby(fields, dropna=False))
    parts.sort(key=lambda kv: tuple(_sort_key(v) for v in (kv[0] if isinstance(kv[0], tuple) else (kv[0],))))
    for key, g in parts:
        key = key if isinstance(key, tuple) else (key,)
        yield dict(zip(fields, key)), g


def short(field: str) -> str:
    return field.split(".")[-1]


def describe(context: dict) -> str:
    """'schedule=linear, subset_size=48000' (missing values as 'default')."""
    return ", ".join(f"{short(k)}={fmt_value(v)}" for k, v in context.items()) or "all trials"


def fmt_value(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "default"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def n_label(n: pd.Series) -> str:
    lo, hi = int(n.min()), int(n.max())
    return f"n={lo}" if lo == hi else f"n={lo}-{hi}"


def at_common_last_step(df: pd.DataFrame, fields: list[str]) -> pd.DataFrame:
    """Per group of `fields`, the rows at the last step *every* trial of the group reached, so a
    half-finished trial is not averaged with finished ones at a different training length."""
    if df.empty:
        return df
    out = []
    for _, g in groups(df, fields):
        last = g.groupby("trial_id")["step"].max().min()
        out.append(g[g["step"] == last])
    return pd.concat(out, ignore_index=True)


@lru_cache(maxsize=None)
def _log_snr_table(schedule: str, T: int, beta_start: float, beta_end: float) -> np.ndarray:
    from diffusion_core.diffusion.schedules import NoiseSchedule

    s = NoiseSchedule.make(schedule, T=int(T), beta_start=float(beta_start), beta_end=float(beta_end))
    with np.errstate(divide="ignore"):
        return np.log(s.snr(np.arange(int(T) + 1)).double().numpy())


def log_snr(rows: pd.DataFrame) -> np.ndarray:
    """lambda_t of each row, from its columns t and SCHEDULE_FIELDS."""
    out = np.empty(len(rows))
    for i, (t, *sched) in enumerate(rows[["t", *SCHEDULE_FIELDS]].itertuples(index=False)):
        out[i] = _log_snr_table(*sched)[int(t)]
    return out
