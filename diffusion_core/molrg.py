"""A mixture of low-rank Gaussians (MoLRG): data whose optimal denoiser is known exactly.

Components c = 1..C with weights pi_c, means mu_c and covariances

    Sigma_c = U_c diag(lambda_c) U_c^T + s0 I,      U_c in R^{d x r} orthonormal, s0 = sigma_0^2 (the floor),

the setting of Wang, Zhang, Zhang, Chen, Ma & Qu (2024, arXiv:2409.02426). Fitted to MNIST
(`fit_mnist`), component c is digit c: pi_c its frequency in the 48,000-image training split,
mu_c its mean image, U_c / lambda_c its top-r principal directions / variances; `random_bases`
gives their zero-mean random-subspace version. A single full-rank component is the Gaussian toy
(gaussian.GaussianToy), and the Gaussian-optimal linear denoiser of any data set (`MoLRG.gaussian`
of its empirical mean and covariance; Li, Dai & Qu, NeurIPS 2024).

Under the forward process x_t = sqrt(a) x_0 + sqrt(s) eps (a = alpha_bar_t, s = 1 - a):

    (1) x_t | c ~ N(sqrt(a) mu_c, C_c),  C_c = a Sigma_c + s I = U_c diag(a lambda) U_c^T + s' I,  s' = a s0 + s
    (2) Woodbury, z = x_t - sqrt(a) mu_c, p = U_c^T z:
            C_c^{-1} z = U_c diag(1 / (a lambda + s')) p + (z - U_c p) / s'
            z^T C_c^{-1} z = sum_i p_i^2 / (a lambda_i + s') + ||z - U_c p||^2 / s'
            log det C_c = sum_i log(a lambda_i + s') + (d - r) log s'
    (3) w_c(x_t) = softmax_c(log pi_c - 1/2 log det C_c - 1/2 z^T C_c^{-1} z)      (log-sum-exp, float64)
    (4) Cov(eps, x_t | c) = sqrt(s) I, so E[eps | x_t, c] = sqrt(s) C_c^{-1} z and
            f*(x_t) = E[eps | x_t] = sum_c w_c(x_t) sqrt(s) C_c^{-1} z_c               (the Bayes-optimal denoiser)
    (5) log p(x_0) = logsumexp_c(log pi_c + log N(x_0; mu_c, Sigma_c)): (2)-(3) with a = 1, s = 0.

Everything is computed in float64; values are not bounded to [-1, 1] (Gaussian data is not):
never clip x_0 for this data. docs/ground_truth.md has the derivation and the tests.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from .diffusion.schedules import NoiseSchedule

MOLRG_BASES = ("mnist", "random")
LOG_2PI = math.log(2.0 * math.pi)


class MoLRG:
    def __init__(self, weights, means, bases, variances, floor: float, image_shape: tuple[int, ...] | None = None):
        f64 = dict(dtype=torch.float64)
        self.weights = torch.as_tensor(weights, **f64).flatten()
        self.means = torch.as_tensor(means, **f64)
        self.bases = torch.as_tensor(bases, **f64)
        self.variances = torch.as_tensor(variances, **f64)
        self.floor = float(floor)
        c, d = self.means.shape
        self.d, self.n_components, self.rank = d, c, self.bases.shape[-1]
        self.image_shape = tuple(image_shape) if image_shape is not None else (d,)
        if self.weights.shape != (c,) or self.bases.shape != (c, d, self.rank) or self.variances.shape != (c, self.rank):
            raise ValueError(f"MoLRG shapes disagree: weights {tuple(self.weights.shape)}, means {(c, d)}, bases "
                             f"{tuple(self.bases.shape)}, variances {tuple(self.variances.shape)}; want (C,), (C, d), "
                             f"(C, d, r), (C, r)")
        if math.prod(self.image_shape) != d:
            raise ValueError(f"image_shape {self.image_shape} does not hold d={d} values")
        if (self.weights < 0).any() or abs(float(self.weights.sum()) - 1.0) > 1e-9:
            raise ValueError(f"MoLRG weights must be >= 0 and sum to 1 (sum {float(self.weights.sum()):.12g})")
        if (self.variances < 0).any() or self.floor < 0:
            raise ValueError("MoLRG variances and floor must be >= 0")
        gram = self.bases.transpose(1, 2) @ self.bases
        if not torch.allclose(gram, torch.eye(self.rank, **f64).expand_as(gram), atol=1e-8):
            raise ValueError("MoLRG bases must have orthonormal columns")
        self.log_weights = self.weights.clamp_min(1e-300).log()

    # ------------------------------------------------------------------ construction
    @classmethod
    def gaussian(cls, mean, cov, image_shape=None, eig_floor: float = 0.0) -> "MoLRG":
        """N(mean, cov) as a one-component, full-rank mixture (floor 0): the Gaussian toy, and the
        optimal denoiser of a Gaussian fitted to a data set. Eigenvalues below 0 that round-off makes
        in a rank-deficient empirical covariance are set to `eig_floor`."""
        mean = torch.as_tensor(mean, dtype=torch.float64).flatten()
        cov = torch.as_tensor(cov, dtype=torch.float64)
        d = mean.numel()
        if cov.shape != (d, d):
            raise ValueError(f"cov must be {d}x{d} to match mean, got {tuple(cov.shape)}")
        if not torch.allclose(cov, cov.T):
            raise ValueError("cov must be symmetric")
        evals, evecs = torch.linalg.eigh(cov)
        tol = 1e-10 * max(1.0, float(evals.abs().max()))
        if float(evals.min()) < -tol:
            raise ValueError(f"cov must be positive semi-definite (smallest eigenvalue {float(evals.min()):.3g})")
        return cls(torch.ones(1), mean[None], evecs[None], evals.clamp_min(eig_floor)[None], 0.0, image_shape)

    @classmethod
    def of_data(cls, x: torch.Tensor) -> "MoLRG":
        """The Gaussian with the empirical mean and covariance (1/(N-1)) of x (N, ...): its `optimal_eps`
        is the Gaussian-optimal linear denoiser of that data set (Li, Dai & Qu 2024)."""
        xf = x.flatten(1).double()
        if xf.shape[0] < 2:
            raise ValueError("the Gaussian of a data set needs >= 2 points")
        mean = xf.mean(0)
        centred = xf - mean
        return cls.gaussian(mean, centred.T @ centred / (xf.shape[0] - 1), tuple(x.shape[1:]))

    # ------------------------------------------------------------------ the maths
    def _ab(self, t, n: int, schedule: NoiseSchedule | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, s) as (n, 1) float64: a = alpha_bar_t, s = 1 - a; t = None means x_0 itself (a = 1, s = 0)."""
        if t is None:
            return torch.ones(n, 1, dtype=torch.float64), torch.zeros(n, 1, dtype=torch.float64)
        t = torch.as_tensor(t).long().cpu()
        a = schedule.alpha_bar.to(torch.float64)[t].reshape(-1, 1)
        a = a.expand(n, 1) if a.shape[0] == 1 else a
        if a.shape[0] != n:
            raise ValueError(f"t has {a.shape[0]} values for {n} points")
        return a, 1.0 - a

    def _per_component(self, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor, with_solve: bool):
        """Per component c: log pi_c + log N(x; sqrt(a) mu_c, C_c) (n, C) and, if asked, C_c^{-1} z_c (C, n, d)."""
        n = x.shape[0]
        sp = a * self.floor + s                                            # s' (n, 1)
        if self.rank < self.d and bool((sp <= 0).any()):
            raise ValueError("the covariance is singular here (floor 0 and a = 1): no density, no inverse")
        logits = torch.empty(n, self.n_components, dtype=torch.float64)
        solves = torch.empty(self.n_components, n, self.d, dtype=torch.float64) if with_solve else None
        for c in range(self.n_components):
            z = x - a.sqrt() * self.means[c]                               # (n, d)
            u = self.bases[c]
            p = z @ u                                                      # U^T z (n, r)
            diag = a * self.variances[c] + sp                              # a lambda + s' (n, r)
            quad = (p.pow(2) / diag).sum(1)
            logdet = diag.log().sum(1)
            if self.rank < self.d:
                orth = z - p @ u.T                                         # z - U U^T z
                quad = quad + orth.pow(2).sum(1) / sp[:, 0]
                logdet = logdet + (self.d - self.rank) * sp[:, 0].log()
            logits[:, c] = self.log_weights[c] - 0.5 * (logdet + quad + self.d * LOG_2PI)
            if with_solve:
                solve = (p / diag) @ u.T                                   # (2) C^{-1} z
                if self.rank < self.d:
                    solve = solve + orth / sp
                solves[c] = solve
        return logits, solves

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.reshape(x.shape[0], -1).to(torch.float64).cpu()
        if xf.shape[1] != self.d:
            raise ValueError(f"points of {xf.shape[1]} values, the mixture has d={self.d}")
        return xf

    @torch.no_grad()
    def optimal_eps(self, x_t: torch.Tensor, t, schedule: NoiseSchedule, chunk: int = 2048) -> torch.Tensor:
        """(4) f*(x_t) = E[eps | x_t] for points x_t (n, ...) at timesteps t (int or (n,)); returned in
        x_t's shape, dtype and device."""
        xf = self._flat(x_t)
        a, s = self._ab(t, xf.shape[0], schedule)
        out = torch.empty_like(xf)
        for lo in range(0, xf.shape[0], chunk):
            sl = slice(lo, lo + chunk)
            logits, solves = self._per_component(xf[sl], a[sl], s[sl], True)
            w = torch.softmax(logits, 1)                                   # (3)
            out[sl] = s[sl].sqrt() * torch.einsum("nc,cnd->nd", w, solves)
        return out.reshape(x_t.shape).to(dtype=x_t.dtype, device=x_t.device)

    @torch.no_grad()
    def responsibilities(self, x_t: torch.Tensor, t, schedule: NoiseSchedule | None) -> torch.Tensor:
        """(3) the posterior w_c(x_t), (n, C) float64; t = None: of x_0 itself."""
        xf = self._flat(x_t)
        a, s = self._ab(t, xf.shape[0], schedule)
        return torch.softmax(self._per_component(xf, a, s, False)[0], 1)

    @torch.no_grad()
    def log_prob(self, x0: torch.Tensor) -> torch.Tensor:
        """(5) log p(x_0) in nats, (n,) float64."""
        xf = self._flat(x0)
        a, s = self._ab(None, xf.shape[0], None)
        return torch.logsumexp(self._per_component(xf, a, s, False)[0], 1)

    def component_of(self, x0: torch.Tensor) -> torch.Tensor:
        """argmax_c of the posterior of x_0: the component a sample belongs to, (n,) long."""
        return self.responsibilities(x0, None, None).argmax(1)

    @torch.no_grad()
    def subspace_distance(self, x0: torch.Tensor) -> torch.Tensor:
        """min_c ||x_0 - (mu_c + U_c U_c^T (x_0 - mu_c))||^2 / d: the distance to the nearest component's
        affine subspace (0 for a sample with no floor noise), (n,) float64."""
        xf = self._flat(x0)
        best = torch.full((xf.shape[0],), math.inf, dtype=torch.float64)
        for c in range(self.n_components):
            z = xf - self.means[c]
            orth = z - (z @ self.bases[c]) @ self.bases[c].T
            best = torch.minimum(best, orth.pow(2).mean(1))
        return best

    def mean(self) -> torch.Tensor:
        """E[x_0] (d,) float64."""
        return self.weights @ self.means

    def covariance(self) -> torch.Tensor:
        """Cov[x_0] (d, d) float64: sum_c pi_c (Sigma_c + mu_c mu_c^T) - m m^T."""
        m = self.weights @ self.means        # not self.mean(): GaussianToy keeps `mean` as its vector
        out = torch.eye(self.d, dtype=torch.float64) * self.floor - torch.outer(m, m)
        for c in range(self.n_components):
            u = self.bases[c] * self.variances[c].sqrt()
            out += self.weights[c] * (u @ u.T + torch.outer(self.means[c], self.means[c]))
        return out

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """n draws (n, *image_shape) and their components (n,): c ~ pi, x = mu_c + U_c (sqrt(lambda_c) * z) +
        sqrt(s0) e with z, e standard normal, all from `generator` in that order."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.rank, generator=generator, dtype=torch.float64)
        e = torch.randn(n, self.d, generator=generator, dtype=torch.float64)
        x = math.sqrt(self.floor) * e
        for c in range(self.n_components):     # per component: never a (n, d, r) gather of the bases
            rows = (comp == c).nonzero().flatten()
            x[rows] += self.means[c] + (z[rows] * self.variances[c].sqrt()) @ self.bases[c].T
        return x.reshape(n, *self.image_shape).to(dtype), comp

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict[str, np.ndarray]:
        return {"weights": self.weights.numpy(), "means": self.means.numpy(), "bases": self.bases.numpy(),
                "variances": self.variances.numpy(), "floor": np.float64(self.floor),
                "image_shape": np.asarray(self.image_shape, dtype=np.int64)}

    def save(self, path: str | os.PathLike) -> Path:
        """An .npz (atomic: a killed process leaves the old file or none)."""
        from .atomic import atomic_write

        path = Path(path)
        with atomic_write(path) as fh:
            np.savez(fh, **self.state())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MoLRG":
        with np.load(path) as z:
            return cls(z["weights"], z["means"], z["bases"], z["variances"], float(z["floor"]),
                       tuple(int(v) for v in z["image_shape"]))


# ---------------------------------------------------------------------- fitted to MNIST
def fit_mnist(images: torch.Tensor, labels: torch.Tensor, rank: int, floor: float, components: int) -> MoLRG:
    """One component per digit 0..components-1 of images (N, 1, 28, 28) in [-1, 1]: weight = the digit's
    frequency among those digits, mean = its mean image, U / lambda = its top-`rank` principal
    directions / variances (sample covariance, 1/(n-1)). Each direction's sign is fixed (its entry of
    largest magnitude positive) so that the same data give the same samples on every machine."""
    x = images.flatten(1).to(torch.float64)
    counts, means, bases, variances = [], [], [], []
    for c in range(components):
        xc = x[labels == c]
        if xc.shape[0] <= rank:
            raise ValueError(f"digit {c} has {xc.shape[0]} images, too few for rank {rank}")
        mu = xc.mean(0)
        _, sv, vt = torch.linalg.svd(xc - mu, full_matrices=False)
        u = vt[:rank].T                                                    # (d, r)
        sign = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True)))
        counts.append(xc.shape[0])
        means.append(mu)
        bases.append(u * sign)
        variances.append(sv[:rank].pow(2) / (xc.shape[0] - 1))
    w = torch.tensor(counts, dtype=torch.float64)
    return MoLRG(w / w.sum(), torch.stack(means), torch.stack(bases), torch.stack(variances), floor,
                 tuple(images.shape[1:]))


def random_bases(rank: int, floor: float, components: int, seed: int, image_shape=(1, 28, 28)) -> MoLRG:
    """Wang et al.'s MoLRG: equal weights, zero means, random orthonormal bases U_c (QR of a seeded
    Gaussian matrix), unit variance along each of the r directions."""
    d = math.prod(image_shape)
    g = torch.Generator().manual_seed(seed)
    bases = []
    for _ in range(components):
        q, r = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=torch.float64))
        bases.append(q * torch.sign(torch.diagonal(r)))                    # a unique QR (diag(R) > 0)
    return MoLRG(torch.full((components,), 1.0 / components, dtype=torch.float64), torch.zeros(components, d),
                 torch.stack(bases),
                 torch.ones(components, rank), floor, image_shape)


def molrg_key(rank: int, floor: float, basis: str, components: int, seed: int) -> str:
    """A short name for one fitted mixture (its cache and study file)."""
    blob = json.dumps({"rank": rank, "floor": float(floor), "basis": basis, "components": components,
                       "seed": seed, "version": 1}, sort_keys=True)
    return f"molrg-{basis}-r{rank}-c{components}-" + hashlib.sha256(blob.encode()).hexdigest()[:10]
