"""Power iteration for the top eigenvalues of one Hessian block (HAWQ), with deflation for top-k."""

from __future__ import annotations

from collections.abc import Callable

import torch

from hessq._errors import ConfigError

MatVec = Callable[[torch.Tensor], torch.Tensor]


def _power(matvec: MatVec, v: torch.Tensor, found: list[torch.Tensor], max_iter: int, tol: float, shift: float = 0.0):
    """Power iteration on (H − shift·I) orthogonal to ``found``: (Rayleigh quotient of H, vector, iterations, converged)."""
    lam, it, ok = None, 0, False
    for it in range(1, max_iter + 1):
        for u in found:
            v = v - torch.dot(v, u) * u
        v = v / v.norm().clamp_min(1e-300)
        hv = matvec(v)
        new = float(torch.dot(v, hv))  # Rayleigh quotient of H (unshifted)
        w = hv - shift * v
        if lam is not None and abs(new - lam) <= tol * max(abs(new), 1e-30):
            lam, ok = new, True
            break
        lam = new
        if float(w.norm()) == 0.0:  # v is in the null space: H is zero here
            ok = True
            break
        v = w
    return lam, v / v.norm().clamp_min(1e-300), it, ok


def power_iteration(
    matvec: MatVec, n: int, *, k: int = 1, max_iter: int = 100, tol: float = 1e-4, generator: torch.Generator,
    device: torch.device | str = "cpu", report: bool = False,
) -> tuple[list[float], int] | tuple[list[float], int, bool]:
    """The top ``k`` eigenvalues of a symmetric operator of size ``n``; returns them and the HVPs used.

    The first is the largest *algebraic* eigenvalue: power iteration finds the dominant
    one, and if that is negative a second run on H − λ_dom·I finds λ_max. Further ones
    come by deflation (orthogonal to the eigenvectors found), as in PyHessian, so they are
    the next largest in magnitude. ``tol`` bounds the relative change of the Rayleigh
    quotient between iterations. With ``report`` a third item says whether every eigenvalue met
    ``tol`` before ``max_iter`` (the precision reached, as for traces).
    """
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    found: list[torch.Tensor] = []
    values: list[float] = []
    used, converged = 0, True
    for j in range(min(k, n)):
        v0 = torch.randn(n, generator=generator, dtype=torch.float64).to(device)
        lam, vec, it, ok = _power(matvec, v0, found, max_iter, tol)
        used += it
        if j == 0 and lam is not None and lam < 0:
            lam2, vec2, it2, ok2 = _power(matvec, vec, found, max_iter, tol, shift=lam)
            used += it2
            if lam2 is not None and lam2 > lam:
                lam, vec, ok = lam2, vec2, ok2
        values.append(float(lam))
        found.append(vec)
        converged = converged and ok
    return (values, used, converged) if report else (values, used)
