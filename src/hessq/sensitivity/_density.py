"""Stochastic Lanczos quadrature (SLQ): the Hessian's eigenvalue density, as PyHessian's ``density``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal


@dataclass
class SpectralDensity:
    """Ritz values (``eigenvalues``) and quadrature weights of each SLQ run (one list per run), and the
    operator's size ``dim``."""

    eigenvalues: list[list[float]]
    weights: list[list[float]]
    dim: int | None = None

    def trace(self) -> tuple[float, float]:
        """Tr(H) from the runs, dim·Σ wλ each (a Hutchinson sample, since v is Rademacher), and its standard error
        (inf with one run): the precision the density's scale is known to."""
        if self.dim is None:
            raise ValueError("this density does not know the operator's size (dim)")
        x = np.array([self.dim * float(np.dot(w, e)) for e, w in zip(self.eigenvalues, self.weights)])
        return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("inf")

    def density(self, grid: np.ndarray | None = None, sigma: float | None = None, num: int = 1000) -> tuple[np.ndarray, np.ndarray]:
        """The density smoothed by Gaussians of width ``sigma`` on ``grid``; integrates to about 1."""
        lam = np.concatenate([np.asarray(e) for e in self.eigenvalues])
        lo, hi = float(lam.min()), float(lam.max())
        pad = 0.01 * max(hi - lo, 1e-12)
        if grid is None:
            grid = np.linspace(lo - pad, hi + pad, num)
        if sigma is None:
            sigma = max((hi - lo) / 200, 1e-12)
        dens = np.zeros_like(grid, dtype=float)
        for e, w in zip(self.eigenvalues, self.weights):
            e, w = np.asarray(e)[:, None], np.asarray(w)[:, None]
            dens += (w * np.exp(-((grid[None, :] - e) ** 2) / (2 * sigma**2)) / (np.sqrt(2 * np.pi) * sigma)).sum(0)
        return grid, dens / len(self.eigenvalues)

    def to_dict(self) -> dict:
        return {"eigenvalues": self.eigenvalues, "weights": self.weights, "dim": self.dim}


def lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], v: torch.Tensor, iters: int) -> tuple[np.ndarray, np.ndarray]:
    """``iters`` Lanczos steps from ``v`` with full re-orthogonalisation: (alphas, betas)."""
    basis = [v / v.norm()]
    alphas, betas = [], []
    for i in range(iters):
        w = matvec(basis[-1])
        a = float(torch.dot(w, basis[-1]))
        alphas.append(a)
        w = w - a * basis[-1] - (betas[-1] * basis[-2] if i > 0 else 0)
        for u in basis:  # full re-orthogonalisation keeps the Ritz values honest
            w = w - torch.dot(w, u) * u
        b = float(w.norm())
        if i == iters - 1 or b < 1e-10 * max(abs(a), 1.0):
            break
        betas.append(b)
        basis.append(w / b)
    return np.array(alphas), np.array(betas)


def slq(matvec, n: int, *, iters: int, n_v: int, generator: torch.Generator, device) -> SpectralDensity:
    """``n_v`` SLQ runs from Rademacher vectors: nodes are the Ritz values, weights the squared first components."""
    eigs, weights = [], []
    for _ in range(n_v):
        v = (torch.randint(0, 2, (n,), generator=generator) * 2 - 1).to(dtype=torch.float64, device=device)
        a, b = lanczos(matvec, v, min(iters, n))
        if len(a) == 1:
            vals, vecs = a, np.ones((1, 1))
        else:
            vals, vecs = eigh_tridiagonal(a, b[: len(a) - 1])
        eigs.append(vals.tolist())
        weights.append((vecs[0, :] ** 2).tolist())
    return SpectralDensity(eigs, weights, n)
