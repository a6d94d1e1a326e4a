"""The README's thesis block is what analysis.thesis_claims computes from results/thesis/ (issue 24):
a number edited in the README, or a record changed without regenerating the block, fails here."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from analysis.thesis_claims import claims, readme_block, thesis_claims_markdown
from diffusion_core.training.ema import init_share_crossing

ROOT = Path(__file__).resolve().parents[1]
THESIS = ROOT / "results" / "thesis"


def test_readme_thesis_block_is_generated_from_the_records():
    want = thesis_claims_markdown(THESIS)
    got = readme_block((ROOT / "README.md").read_text())
    assert got == want, ("README.md's thesis block differs from the records: regenerate it with "
                         "`python -m analysis.thesis_claims results/thesis`")


def test_the_quoted_numbers_are_the_reviewed_ones():
    """The numbers issue 24 derived by hand from the same records."""
    c = claims(THESIS)
    assert init_share_crossing(0.9999, 0.05) == 29_956 and 0.9999 ** 29_956 <= 0.05 < 0.9999 ** 29_955
    assert c["ema_epoch"] == pytest.approx(9.985, abs=1e-3)
    assert init_share_crossing(0.999, 0.01, warmup=True) < init_share_crossing(0.999, 0.01)   # warm-up forgets sooner
    assert c["fid_done_by_10"] == pytest.approx(0.95, abs=0.005)
    assert (round(c["mean_x10"], 1), round(c["cov_x10"], 1)) == (18.8, 16.4)
    assert (round(c["mean_left53"], 3), round(c["cov_left53"], 3)) == (0.284, 0.275)
    assert round(c["cov_over_mean_start"], 2) == 1.75 and 0.63 <= c["cov_share_drop"] <= 0.64
    assert c["overrides"] == {"training.device_noise": True, "training.deferred_sync": True,
                              "training.cuda_graph": True, "evaluation.batch_size": 1000,
                              "evaluation.precision": "bf16", "evaluation.compile": True}
    tr = c["trial"]
    assert tr["eval_seconds"] == pytest.approx(c["evals"]["eval_seconds"].sum())
    assert tr["eval_seconds"] + tr["train_seconds"] == pytest.approx(tr["wall_seconds"])
    # the real-data H(Y) is recorded, not ln(real IS) (a lower bound on it)
    last = c["last"]
    assert last["real_h_y"] > math.log(last["real_inception_score"])
    assert last["real_h_y"] - last["real_h_y_given_x"] == pytest.approx(math.log(last["real_inception_score"]),
                                                                        rel=1e-4)
