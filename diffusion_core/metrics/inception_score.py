"""Inception score in the MNIST classifier: IS = exp(H(Y) - H(Y|X)) = exp(E_x KL(p(y|x) || p(y))).

H(Y) is the entropy of the marginal p(y) = E_x p(y|x) (high when all classes appear),
H(Y|X) = E_x H(p(y|x)) (low when each sample is confidently one digit). For 10 classes
IS lies in [1, 10]. Natural logarithms throughout.

The N samples are cut into `splits` contiguous, near-equal parts (as in Salimans et
al.'s code); per part we compute H(Y), H(Y|X) and IS. Reported: h_y and h_y_given_x =
their means over parts, inception_score = exp(h_y - h_y_given_x) (so that
log IS = H(Y) - H(Y|X) holds exactly for the recorded numbers; it is the geometric mean
of the per-part scores), inception_score_std = the standard deviation of the per-part
scores, and inception_score_arith = their arithmetic mean (the conventional figure;
it differs from the geometric mean by O(std^2 / IS)).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.special import entr


def _entropies(p: np.ndarray) -> tuple[float, float]:
    """(H(Y), H(Y|X)) of rows p(y|x)."""
    h_y = float(entr(p.mean(axis=0)).sum())
    h_y_given_x = float(entr(p).sum(axis=1).mean())
    return h_y, h_y_given_x


def inception_score(probs, splits: int = 5) -> dict:
    """Entropies and IS of class probabilities (N, C) (rows summing to 1), over `splits` parts."""
    p = probs.detach().cpu().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
    p = p.astype(np.float64)
    if p.ndim != 2 or p.shape[0] < splits or splits < 1:
        raise ValueError(f"need (N >= splits, C) probabilities and splits >= 1; got {p.shape}, splits={splits}")
    parts = np.array_split(p, splits)
    hs = np.array([_entropies(q) for q in parts])              # (splits, 2)
    scores = np.exp(hs[:, 0] - hs[:, 1])
    h_y, h_y_given_x = float(hs[:, 0].mean()), float(hs[:, 1].mean())
    return {
        "inception_score": float(np.exp(h_y - h_y_given_x)),
        "inception_score_std": float(scores.std()),
        "inception_score_arith": float(scores.mean()),
        "h_y": h_y,
        "h_y_given_x": h_y_given_x,
        "inception_score_splits": splits,
    }
