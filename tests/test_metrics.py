"""diffusion_core.metrics on real MNIST: classifier, FID, IS, precision/recall, memorization.

Needs MNIST (conftest.py's `data_root` fixture fails, saying where to put it, if it is
missing) and the shipped classifier weights. Features are computed once per module
(10,000 test images + 8,000 noisy copies).
"""
from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
import torch

from diffusion_core.config import METRIC_KEYS
from diffusion_core.data import mnist_splits, to_unit_range
from diffusion_core.metrics import (ClassifierWeightsError, InceptionUnavailableError, PROVENANCE_PATH, ReferenceStats,
                                    WEIGHTS_PATH, evaluate_samples, feature_statistics, fid_from_features,
                                    frechet_distance, inception_fid_cifar10, inception_score, knn_radii,
                                    load_classifier, memorization, precision_recall, reference_statistics)
from diffusion_core.metrics.classifier import train_classifier
from diffusion_core.metrics.fid import sqrtm_psd
from diffusion_core.model.unet import count_parameters


@pytest.fixture(scope="module")
def splits(data_root):
    return mnist_splits(data_root, with_test=True)


@pytest.fixture(scope="module")
def clf():
    return load_classifier("cpu")


@pytest.fixture(scope="module")
def features_of_test_set(clf, splits):
    """Features (float64 numpy) and p(y|x) (numpy) of all 10,000 MNIST test images."""
    f, p = clf.features_and_probs(splits.test.images)
    return f.double().numpy(), p.double().numpy()


@pytest.fixture(scope="module")
def halves(features_of_test_set, splits):
    """Two disjoint seeded halves of the test set: (features A, features B, labels A, labels B, idx A, idx B)."""
    perm = torch.randperm(10_000, generator=torch.Generator().manual_seed(0)).numpy()
    a, b = perm[:5000], perm[5000:]
    f = features_of_test_set[0]
    y = splits.test.labels.numpy()
    return f[a], f[b], y[a], y[b], a, b


# ------------------------------------------------------------------------ classifier
def test_shipped_classifier_provenance():
    meta = json.loads(PROVENANCE_PATH.read_text())
    assert WEIGHTS_PATH.stat().st_size <= 5 * 2**20
    assert meta["test_accuracy"] >= 0.993
    for key in ("sha256", "seed", "epochs", "test_accuracy", "train_seconds", "torch_version", "command"):
        assert key in meta
    state = torch.load(WEIGHTS_PATH, map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_classifier_accuracy_on_test_set(features_of_test_set, splits, clf):
    acc = float((features_of_test_set[1].argmax(1) == splits.test.labels.numpy()).mean())
    assert acc >= 0.993, acc
    assert acc == pytest.approx(json.loads(PROVENANCE_PATH.read_text())["test_accuracy"], abs=1e-4)
    assert features_of_test_set[0].shape == (10_000, 128) and count_parameters(clf) < 1_000_000


def test_classifier_accepts_uint8_and_unit_range_alike(clf, splits):
    x = splits.test.images[:64]
    f8, p8 = clf.features_and_probs(x, batch_size=16)
    ff, pf = clf.features_and_probs(to_unit_range(x), batch_size=64)
    assert torch.allclose(f8, ff, atol=1e-4) and torch.allclose(p8, pf, atol=1e-5)
    assert torch.allclose(p8.sum(1), torch.ones(64), atol=1e-5)


def test_load_classifier_rejects_tampered_weights(tmp_path):
    w, p = tmp_path / "c.pt", tmp_path / "c.json"
    shutil.copy(WEIGHTS_PATH, w)
    shutil.copy(PROVENANCE_PATH, p)
    load_classifier("cpu", weights=w)                           # intact copy loads
    data = bytearray(w.read_bytes())
    data[-100] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ClassifierWeightsError, match="sha256"):
        load_classifier("cpu", weights=w)


def test_train_classifier_refuses_to_overwrite(tmp_path, data_root):
    w = tmp_path / "c.pt"
    w.write_bytes(b"x")
    with pytest.raises(FileExistsError, match="force"):
        train_classifier(out=w, data_root=data_root)


def test_train_classifier_is_deterministic(tmp_path, data_root):
    kw = dict(data_root=data_root, seed=3, epochs=1, batch_size=64, train_subset=256, evaluate_test=False,
              progress=False)
    m1 = train_classifier(out=tmp_path / "a.pt", **kw)
    m2 = train_classifier(out=tmp_path / "b.pt", **kw)
    assert m1["sha256"] == m2["sha256"]
    assert m1["sha256"] != train_classifier(out=tmp_path / "c.pt", **{**kw, "seed": 4})["sha256"]
    load_classifier("cpu", weights=tmp_path / "a.pt")           # what it writes, load_classifier reads


# ------------------------------------------------------------------------ inception score
def test_inception_score_closed_forms():
    eye = np.eye(10)[np.arange(1000) % 10]                      # confident, all classes equally often
    r = inception_score(eye, splits=5)
    assert r["inception_score"] == pytest.approx(10.0, rel=1e-12)
    assert r["h_y"] == pytest.approx(np.log(10)) and r["h_y_given_x"] == pytest.approx(0.0, abs=1e-12)
    assert r["inception_score_std"] == pytest.approx(0.0, abs=1e-9)
    one = inception_score(np.eye(10)[np.zeros(500, int)], splits=5)
    assert one["inception_score"] == pytest.approx(1.0) and one["h_y"] == pytest.approx(0.0, abs=1e-12)
    uniform = inception_score(np.full((500, 10), 0.1), splits=5)  # maximally unsure: IS = 1
    assert uniform["inception_score"] == pytest.approx(1.0)


def test_inception_score_of_mnist_test_set_near_10(features_of_test_set):
    r = inception_score(features_of_test_set[1], splits=5)
    # Measured with the shipped classifier: IS = 9.804 (std over 5 splits 0.060), H(Y) = 2.2997,
    # H(Y|X) = 0.0169.
    # 10 is the maximum (10 equally frequent, confidently classified digits); MNIST's class frequencies are
    # slightly unequal (892..1135 per digit), so H(Y) < ln 10 = 2.3026.
    assert 9.6 < r["inception_score"] <= 10.0
    assert r["h_y"] == pytest.approx(np.log(10), abs=0.01)
    assert r["h_y_given_x"] < 0.05
    assert np.log(r["inception_score"]) == pytest.approx(r["h_y"] - r["h_y_given_x"], rel=1e-12, abs=1e-15)


def test_inception_score_single_digit_is_one(features_of_test_set, splits):
    # Measured: IS between 1.02 (digit 1) and 1.05 (digit 7), H(Y) between 0.03 and 0.07 -- not exactly
    # 1 and 0 because a few images per digit are (mis)classified as another digit with some confidence.
    y = splits.test.labels.numpy()
    for digit in range(10):
        r = inception_score(features_of_test_set[1][y == digit], splits=5)
        assert 1.0 <= r["inception_score"] < 1.1, (digit, r)
        assert r["h_y"] < 0.1, (digit, r)
        assert np.log(r["inception_score"]) == pytest.approx(r["h_y"] - r["h_y_given_x"], rel=1e-12, abs=1e-15)


# ------------------------------------------------------------------------ FID maths
def test_frechet_terms_sum_and_closed_form_diagonal():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0, 2, 16), rng.uniform(0, 2, 16)
    a[:5] = 0.0                                                 # rank-deficient
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    fd = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert fd.mean_term == pytest.approx(((mu1 - mu2) ** 2).sum(), rel=1e-12)
    assert fd.cov_term == pytest.approx(((np.sqrt(a) - np.sqrt(b)) ** 2).sum(), rel=1e-10)
    assert fd.mean_term + fd.cov_term == fd.total


def test_frechet_rotation_invariant_closed_form():
    # For commuting S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T the covariance term is sum (sqrt a - sqrt b)^2.
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(32, 32)))
    a, b = rng.uniform(0, 3, 32), rng.uniform(0, 3, 32)
    fd = frechet_distance(np.zeros(32), q @ np.diag(a) @ q.T, np.zeros(32), q @ np.diag(b) @ q.T)
    assert fd.cov_term == pytest.approx(((np.sqrt(a) - np.sqrt(b)) ** 2).sum(), rel=1e-8)
    assert fd.mean_term == 0.0


def test_psd_clipping_rank_deficient_covariance(halves):
    fa = halves[0]
    few = fa[:40]                                               # 40 samples in 128-d: covariance rank <= 39
    mu1, s1 = feature_statistics(few)
    assert np.linalg.matrix_rank(s1) < 128
    w = np.linalg.eigvalsh(s1)
    assert w.min() < 0 or w.min() < 1e-10 * w.max()             # numerically singular (often slightly negative)
    mu2, s2 = feature_statistics(fa)
    fd = frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(fd.total) and fd.cov_term >= 0 and fd.mean_term + fd.cov_term == fd.total
    same = frechet_distance(mu1, s1, mu1, s1)                   # identical singular covariances -> 0
    assert same.total == pytest.approx(0.0, abs=1e-6 * np.trace(s1))
    # an explicitly indefinite "covariance" (tiny negative eigenvalue) does not raise
    s_neg = s1 - 1e-9 * np.eye(128)
    assert np.isfinite(frechet_distance(mu1, s_neg, mu2, s2).total)
    r = sqrtm_psd(s1)
    assert np.allclose(r @ r, s1, atol=1e-6 * np.abs(s1).max())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # clean-fid passes scipy sqrtm a deprecated arg
def test_agrees_with_cleanfid(halves):
    from cleanfid import fid as cfid
    fa, fb = halves[0], halves[1]
    noisy = fb + np.random.default_rng(0).normal(scale=0.3 * fb.std(), size=fb.shape)
    for x, y in [(fa, fb), (fa, noisy), (fa[:2000], fb[:3000])]:
        s = feature_statistics(x) + feature_statistics(y)
        ours = frechet_distance(*s).total
        theirs = float(cfid.frechet_distance(*s))
        assert ours == pytest.approx(theirs, rel=1e-6), (ours, theirs)


# ------------------------------------------------------------------------ FID on real MNIST
def test_fid_of_disjoint_real_halves_small(halves, features_of_test_set):
    fd = fid_from_features(halves[0], halves[1])
    # Measured: 0.223 (mean term 0.057, covariance term 0.166) for two 5,000-image halves of the
    # test set, against a feature-covariance trace of 137 and an FID of 292 between the 0s and the 1s.
    tr = np.trace(feature_statistics(features_of_test_set[0])[1])
    assert fd.total < 0.01 * tr, (fd, tr)
    y = halves[2]
    zeros_vs_ones = fid_from_features(halves[0][y == 0], halves[0][y == 1])
    assert zeros_vs_ones.total > 100 * fd.total


def test_fid_rises_monotonically_with_noise(clf, splits, halves):
    b_idx = halves[5]
    ref = feature_statistics(halves[0])
    x = to_unit_range(splits.test.images[torch.from_numpy(b_idx[:2000])])
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(x.shape, generator=g)
    totals = []
    for sigma in (0.0, 0.1, 0.2, 0.4, 0.8):
        f = clf.features((x + sigma * eps).clamp(-1, 1)).double().numpy()
        totals.append(frechet_distance(*ref, *feature_statistics(f)).total)
    assert all(t1 < t2 for t1, t2 in zip(totals, totals[1:])), totals
    assert totals[-1] > 20 * totals[0]


def test_reference_statistics_cache(tmp_path, splits, monkeypatch, data_root):
    class Stub:                                                 # cheap "features": 4x4-pooled pixels
        sha256 = "ab" * 32
        calls = 0

        def features(self, x, batch_size=500):
            Stub.calls += 1
            return torch.nn.functional.avg_pool2d(to_unit_range(x), 7).flatten(1)

    ref = reference_statistics(Stub(), "test", data_root=data_root, cache_dir=tmp_path)
    assert ref.n == 10_000 and ref.path.exists() and ref.path.parent == tmp_path and Stub.calls == 1
    assert "mnist-test" in ref.path.name and Stub.sha256[:16] in ref.path.name
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    again = reference_statistics(Stub(), "test", data_root=data_root, cache_dir=tmp_path)
    assert Stub.calls == 1 and np.array_equal(again.sigma, ref.sigma) and again.sigma.dtype == np.float64
    monkeypatch.setenv("STUDYCTL_CACHE_DIR", str(tmp_path / "env"))
    val = reference_statistics(Stub(), "val", data_root=data_root)
    assert val.n == 12_000 and val.path.parent == tmp_path / "env"


# ------------------------------------------------------------------------ precision / recall
def test_precision_recall_real_vs_real_high_and_single_digit_recall_drops(halves):
    fa, fb, ya, yb = halves[:4]
    rr = precision_recall(fa, fb, k=3)
    # Measured: precision 0.913, recall 0.904 (5,000 vs 5,000, k = 3; not 1: k-NN balls of a finite
    # sample do not cover the other sample's outliers).
    assert rr["precision"] > 0.85 and rr["recall"] > 0.85, rr
    ones = precision_recall(fa, fb[yb == 1], k=3)               # mode collapse onto one digit
    # Measured: precision 0.926, recall 0.132 (the 1s are ~11% of the data).
    assert ones["precision"] > 0.85, ones                       # the 1s are all realistic ...
    assert ones["recall"] < 0.25, ones                          # ... but cover only the 1s


def test_precision_recall_disjoint_clusters():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 8)).astype(np.float32)
    r = precision_recall(a, a + 100.0, k=3, chunk=64)
    assert r == {"precision": 0.0, "recall": 0.0}
    r = precision_recall(a, a.copy(), k=3, chunk=64)            # identical sets: every point inside its own ball
    assert r == {"precision": 1.0, "recall": 1.0}


# ------------------------------------------------------------------------ memorization
def test_memorization_train_vs_itself_and_test(splits):
    train = splits.train
    mem_train = memorization(train.images[:1000], train)
    assert mem_train.memorized_fraction == 1.0
    assert np.array_equal(mem_train.nn_index, np.arange(1000))
    assert mem_train.d1.max() < 0.1                              # exact copies (float32 round-off only)
    mem_test = memorization(splits.test.images[:1000], train)
    # Measured: 0 of these 1,000 test images is memorized; median d1 = 8.88 (5%: 3.26, 95%: 12.27),
    # while training images find themselves at d1 <= 0.026 (float32 round-off) and d2 ~ 8.7.
    assert mem_test.memorized_fraction < 0.05
    assert np.median(mem_test.d1) > 5.0 and (mem_test.d1 <= mem_test.d2).all()
    q = mem_test.quantiles
    assert q[0.05] <= q[0.5] <= q[0.95]


def test_memorization_matches_brute_force(splits):
    train = to_unit_range(splits.train.images[:3000]).flatten(1).double()
    x = to_unit_range(splits.test.images[:50]).flatten(1).double()
    d = torch.cdist(x, train)
    v, j = d.topk(2, largest=False)
    mem = memorization(splits.test.images[:50], splits.train.images[:3000], max_block_bytes=4 * 3000 * 7)
    assert np.array_equal(mem.nn_index, j[:, 0].numpy())
    assert np.allclose(mem.d1, v[:, 0].numpy(), rtol=1e-4) and np.allclose(mem.d2, v[:, 1].numpy(), rtol=1e-4)


# ------------------------------------------------------------------------ evaluate_samples
def test_evaluate_samples_flat_dict(clf, splits, halves, features_of_test_set):
    fa, _, _, _, a_idx, b_idx = halves
    mu, sigma = feature_statistics(fa)
    ref = ReferenceStats(fa.astype(np.float32), mu, sigma, "mnist", "test-half-a", clf.sha256)
    samples = splits.test.images[torch.from_numpy(b_idx[:2000])]
    timings = {}
    m = evaluate_samples(to_unit_range(samples), ref, clf, splits.train.images[:5000], timings=timings)
    assert set(METRIC_KEYS) <= set(m) and all(isinstance(m[k], float) for k in METRIC_KEYS)
    assert set(timings) == {"features", "fid", "inception_score", "precision_recall", "memorization"}
    fb = features_of_test_set[0][b_idx[:2000]]
    assert m["fid"] == pytest.approx(fid_from_features(fa, fb).total, rel=1e-4)
    assert m["fid_mean_term"] + m["fid_cov_term"] == m["fid"]
    assert m["inception_score"] > 9.5 and m["precision"] > 0.85 and m["recall"] > 0.8
    assert np.log(m["inception_score"]) == pytest.approx(m["h_y"] - m["h_y_given_x"], rel=1e-12)
    assert m["memorized_fraction"] < 0.05
    u8 = evaluate_samples(samples[:200], ref, clf)               # uint8 input, memorization skipped
    assert np.isnan(u8["memorized_fraction"]) and u8["inception_score"] > 5


def test_inception_fid_cifar10_fails_fast_offline(tmp_path):
    t = time.perf_counter()
    with pytest.raises(InceptionUnavailableError, match="inception-2015-12-05.pt"):
        inception_fid_cifar10(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), weights_dir=tmp_path)
    assert time.perf_counter() - t < 10


# ------------------------------------------------------------------------ intervals (metrics/intervals.py)
def test_half_sample_intervals_match_the_noise_of_independent_draws(features_of_test_set, halves):
    """Reference: test-set half a. 'Samples': 1,000 real images of half b. Each metric's interval
    must contain its value and say the sd that 5 independent 1,000-image draws of half b show (within
    the noise of 5 draws), and precision's (a mean of 0/1 indicators) must have the binomial width
    1.96 sqrt(p (1 - p) / n)."""
    from diffusion_core.config import INTERVAL_KEYS
    from diffusion_core.metrics.fid import fid_from_features
    from diffusion_core.metrics.intervals import half_sample_intervals

    fa, _, _, _, _, b_idx = halves
    feats, probs = features_of_test_set
    mu, sigma = feature_statistics(fa)
    radii = knn_radii(fa, 3)
    draws = [b_idx[i * 1000:(i + 1) * 1000] for i in range(len(b_idx) // 1000)]    # 5 disjoint draws
    observed = []
    for d in draws:
        f = feats[d]
        pr = precision_recall(fa, f, real_radii=radii)
        observed.append({"fid": fid_from_features(fa, f).total, "precision": pr["precision"],
                         "recall": pr["recall"], "inception_score": inception_score(probs[d])["inception_score"]})
    first = draws[0]
    iv = half_sample_intervals(feats[first], probs[first], mu, sigma, fa, radii, observed[0], n_boot=50, seed=0)
    assert set(iv) == set(INTERVAL_KEYS)
    for m in ("fid", "inception_score", "precision", "recall"):
        lo, hi = iv[f"{m}_lo"], iv[f"{m}_hi"]
        assert lo < observed[0][m] < hi, (m, lo, observed[0][m], hi)
        # The interval's sd against the sd over the 5 independent draws (log scale for FID)
        log = m == "fid"
        implied = (np.log(hi / lo) if log else hi - lo) / (2 * 1.96)
        spread = np.std([np.log(o[m]) if log else o[m] for o in observed], ddof=1)
        assert 0.5 < implied / spread < 2.5, (m, implied, spread)   # measured 1.0-1.5 (sd of 5 draws: +-35%)
    p = observed[0]["precision"]
    assert (iv["precision_hi"] - iv["precision_lo"]) / 2 == pytest.approx(1.96 * np.sqrt(p * (1 - p) / 1000), rel=0.35)
    assert iv["fid_lo"] > 0                                    # on the log scale: never below 0


def test_evaluate_samples_records_intervals_only_when_asked(clf, splits, halves):
    fa, _, _, _, _, b_idx = halves
    mu, sigma = feature_statistics(fa)
    ref = ReferenceStats(fa.astype(np.float32), mu, sigma, "mnist", "test-half-a", clf.sha256)
    samples = splits.test.images[torch.from_numpy(b_idx[:300])]
    off = evaluate_samples(samples, ref, clf, splits=3)
    on = evaluate_samples(samples, ref, clf, splits=3, interval_halves=20, interval_seed=1)
    assert all(np.isnan(off[k]) for k in METRIC_KEYS if k.endswith(("_lo", "_hi")))
    assert all(on[f"{m}_lo"] < on[m] < on[f"{m}_hi"] for m in ("fid", "inception_score", "precision", "recall"))
    assert {k: on[k] for k in METRIC_KEYS if not k.endswith(("_lo", "_hi"))} == pytest.approx(
        {k: off[k] for k in METRIC_KEYS if not k.endswith(("_lo", "_hi"))}, nan_ok=True)
