"""Independent references shared by the tests of the pivoted factorizations and of subset
selection (``test_linalg``, ``test_cholesky``, ``test_selection``): partial column norms in float64
and a pivot comparison that tolerates near-ties.

Pivots. Both LAPACK and our code estimate partial norms by downdating, with different rounding, so
two candidates whose norms agree to a few ulps (a near-tie) may legitimately be ordered
differently; :func:`assert_same_pivots` accepts a first mismatch only when it is such a near-tie,
measured independently in float64.
"""

from __future__ import annotations

import numpy as np
import torch

DTYPES = [torch.float32, torch.float64]
NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def machine_eps(dtype: torch.dtype) -> float:
    """Machine epsilon of ``dtype``."""
    return torch.finfo(dtype).eps


def partial_norms(A: np.ndarray, chosen: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Norms of ``A[:, cols]`` after projecting out ``span(A[:, chosen])``, in float64."""
    A = A.astype(np.float64)
    if len(chosen) == 0:
        return np.linalg.norm(A[:, cols], axis=0)
    Qc, _ = np.linalg.qr(A[:, chosen])
    E = A[:, cols] - Qc @ (Qc.T @ A[:, cols])
    return np.linalg.norm(E, axis=0)


def assert_same_pivots(
    A: np.ndarray, perm: np.ndarray, perm_ref: np.ndarray, count: int, near_tie: float
) -> None:
    """Check ``perm[:count] == perm_ref[:count]``, tolerating a first mismatch at a near-tie."""
    diff = np.flatnonzero(perm[:count] != perm_ref[:count])
    if diff.size == 0:
        return
    j = int(diff[0])
    cand = np.array([perm[j], perm_ref[j]])
    nrm = partial_norms(A, perm_ref[:j], cand)
    rel = abs(nrm[0] - nrm[1]) / nrm.max()
    assert rel <= near_tie, (
        f"pivot {j} differs: ours {perm[j]} (norm {nrm[0]:.9g}) vs LAPACK {perm_ref[j]} "
        f"(norm {nrm[1]:.9g}), relative gap {rel:.3g} > {near_tie:.1g}"
    )


def low_rank(rng: np.random.Generator, m: int, n: int, rank: int) -> np.ndarray:
    """A random ``(m, n)`` matrix of rank ``rank``."""
    return rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n))


def orthonormal_basis(rng: np.random.Generator, n: int, decay: float = 3.0) -> torch.Tensor:
    """Eigenvectors (largest first) of the Gram matrix of features with decaying scales."""
    X = rng.standard_normal((n, 3 * n)) * np.logspace(0, -decay, n)[:, None]
    w, U = np.linalg.eigh(X @ X.T)
    return torch.from_numpy(U[:, ::-1].copy())
