"""The one tolerance rule of the statistical tests (see README.md in this folder).

A Monte Carlo mean is compared with an exact value (closed form, enumeration or quadrature)
within ``Z`` standard errors of that mean, the standard error estimated from the same rows.
With the seed fixed by ``conftest.py`` each test passes or fails the same way every time; a
correct estimator misses by more than 4.5 standard errors with probability below 1e-5 per
coordinate, while the wrong estimators these tests guard against miss by tens of them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

Z = 4.5


def z_scores(rows: Tensor, exact: Tensor | float, *, atol: float = 1e-9) -> Tensor:
    """``|mean - exact| / (standard error + atol)`` per element of rows ``(R, *shape)``."""
    rows = rows.detach().double()
    exact_t = torch.as_tensor(exact, dtype=torch.float64, device=rows.device)
    se = rows.std(0) / math.sqrt(rows.shape[0])
    return (rows.mean(0) - exact_t).abs() / (se + atol)


def assert_unbiased(
    rows: Tensor | Mapping[str, Tensor],
    exact: Tensor | float | Mapping[str, Tensor | float],
    *,
    z: float = Z,
    atol: float = 1e-9,
) -> None:
    """Assert every element's mean lies within ``z`` standard errors (plus ``atol``) of exact."""
    if isinstance(rows, Mapping):
        assert isinstance(exact, Mapping), "exact must be a dict when rows is one"
        missing = sorted(set(exact) - set(rows))
        assert not missing, f"no estimates for {missing}; got {sorted(rows)}"
        for name in exact:
            assert_unbiased(rows[name], exact[name], z=z, atol=atol)
        return
    rows = rows.detach().double()
    exact_t = torch.as_tensor(exact, dtype=torch.float64, device=rows.device)
    se = rows.std(0) / math.sqrt(rows.shape[0])
    error = (rows.mean(0) - exact_t).abs()
    ok = error <= z * se + atol
    assert bool(ok.all()), (
        f"mean {rows.mean(0).tolist()} vs exact {exact_t.tolist()}: "
        f"{(error / (se + atol)).max().item():.1f} standard errors off (tolerance {z})"
    )
