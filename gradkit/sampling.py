r"""Clever sampling: antithetic and stratified draws of Gaussian noise, measured.

A Monte Carlo estimate averages a function of independent draws; nothing forces the draws to
be independent, only each to have the right distribution. Two classical schemes
(Glasserman 2003, ch. 4) make them *negatively dependent* instead, which leaves the mean
unchanged and can lower the variance of the average:

* **antithetic**: draws come in pairs :math:`(\epsilon, -\epsilon)`. For a function
  :math:`h`, the pair's average has variance :math:`\tfrac12(\operatorname{Var} h +
  \operatorname{Cov}(h(\epsilon), h(-\epsilon)))` per pair, against :math:`\tfrac12
  \operatorname{Var} h` for two independent draws: it helps when :math:`h` is close to odd
  (its even part is what remains) and hurts when it is close to even.
* **stratified** (Latin hypercube): for each coordinate, the :math:`n` uniforms are
  :math:`u_i = (\pi(i) + U_i)/n` with a random permutation :math:`\pi`, one draw in each of
  :math:`n` equal-probability strata, and :math:`\epsilon = \Phi^{-1}(u)`. In one dimension
  the variance of the average of a smooth :math:`h` falls from :math:`O(1/n)` to
  :math:`O(1/n^3)`.

Both make the rows of one estimate dependent, so the variance of a scheme is the variance of
the *whole* :math:`n`-draw estimate over independent repetitions, which :func:`compare_schemes`
measures (against the exact gradient by quadrature). The same idea appears across the book:
the coupled measure-valued derivative of a Gaussian mean uses mirror images
:math:`\mu \pm \sigma W` (antithetic), and ARM and DisARM difference the cost over the
antithetic pair :math:`u, 1 - u` of one uniform.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from gradkit import _checks

__all__ = ["SCHEMES", "compare_schemes", "normal_noise"]

SCHEMES = ("iid", "antithetic", "stratified")


def normal_noise(
    num_samples: int,
    shape: Sequence[int] = (),
    *,
    scheme: str = "iid",
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""Standard normal draws ``(num_samples, *shape)`` under a sampling scheme.

    Every row is :math:`\mathcal N(0, 1)` in every scheme; the schemes differ in how rows
    depend on each other: ``"iid"`` (independent), ``"antithetic"`` (row ``i + n/2`` is minus
    row ``i``; ``num_samples`` must be even) and ``"stratified"`` (per coordinate one draw in
    each of ``num_samples`` equal-probability strata, in random order).

    Raises:
        ValueError: for an unknown scheme, or an odd ``num_samples`` with ``"antithetic"``.

    Example:
        >>> import torch
        >>> eps = normal_noise(4, scheme="antithetic", generator=torch.Generator().manual_seed(0))
        >>> bool((eps[:2] == -eps[2:]).all())
        True
    """
    _checks.check_num_samples(num_samples)
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    shape = tuple(shape)
    dtype = dtype or torch.get_default_dtype()
    if scheme == "iid":
        return torch.randn((num_samples, *shape), generator=generator, dtype=dtype, device=device)
    if scheme == "antithetic":
        if num_samples % 2:
            raise ValueError(
                f"antithetic draws come in pairs, so num_samples must be even, got {num_samples}"
            )
        half = torch.randn(
            (num_samples // 2, *shape), generator=generator, dtype=dtype, device=device
        )
        return torch.cat([half, -half])
    width = math.prod(shape)
    keys = torch.rand((width, num_samples), generator=generator, device=device)
    order = keys.argsort(1).T.to(dtype)  # a random permutation of the strata per coordinate
    u = order + torch.rand((num_samples, width), generator=generator, dtype=dtype, device=device)
    u = (u / num_samples).clamp(torch.finfo(dtype).tiny, 1 - torch.finfo(dtype).eps)
    return (math.sqrt(2.0) * torch.erfinv(2 * u - 1)).reshape(num_samples, *shape)


def compare_schemes(
    f: Callable[[Tensor], Tensor],
    mu: float,
    sigma: float,
    num_samples: int,
    repeats: int,
    *,
    estimator: str = "score_function",
    schemes: Sequence[str] = SCHEMES,
    generator: torch.Generator | None = None,
) -> Any:
    r"""The variance of an :math:`n`-draw estimate of :math:`\partial_\mu \mathbb{E}[f(x)]`,
    :math:`x \sim \mathcal N(\mu, \sigma^2)`, under each sampling scheme.

    ``estimator="score_function"`` averages :math:`f(x)\,\epsilon/\sigma`;
    ``"pathwise"`` averages :math:`f'(x)` (autograd). Each of ``repeats`` independent
    estimates uses ``num_samples`` draws of :func:`normal_noise`.

    Returns:
        a pandas DataFrame with one row per scheme and the columns ``scheme``, ``mean`` (over
        the repeats), ``exact`` (Gauss–Hermite quadrature), ``z``, ``variance`` (of one
        ``num_samples``-draw estimate), ``variance_se`` (its standard error, from
        :func:`gradkit.diagnostics.variance_standard_error`) and ``ratio`` (to the ``"iid"``
        variance, when ``"iid"`` is among the schemes).

    Example:
        >>> t = compare_schemes(lambda x: x**2, 1.0, 1.0, 8, 200)
        >>> list(t.scheme)
        ['iid', 'antithetic', 'stratified']
    """
    import pandas as pd

    from gradkit.diagnostics import variance_standard_error
    from gradkit.quadrature import gaussian_expectation

    if estimator not in ("score_function", "pathwise"):
        raise ValueError(f"estimator must be 'score_function' or 'pathwise', got {estimator!r}")
    _checks.check_num_samples(repeats, 2, "a variance over repeats needs two")
    exact = float(gaussian_expectation(lambda x: f(x) * (x - mu) / sigma**2, mu, sigma))
    rows = []
    for scheme in schemes:
        # each column is one estimate's draws (the schemes act along dim 0, per column)
        eps = normal_noise(
            num_samples, (repeats,), scheme=scheme, generator=generator, dtype=torch.float64
        ).T  # (repeats, num_samples)
        x = mu + sigma * eps
        if estimator == "score_function":
            values = f(x) * eps / sigma
        else:
            x = x.requires_grad_(True)
            (values,) = torch.autograd.grad(f(x).sum(), x)
        estimates = values.mean(1).detach()
        variance = estimates.var().item()
        # a floor for estimators that are exact up to rounding (antithetic pathwise on x²)
        se = max(estimates.std().item() / math.sqrt(repeats), 1e-12 * max(1.0, abs(exact)))
        rows.append(
            {
                "scheme": scheme,
                "mean": estimates.mean().item(),
                "exact": exact,
                "z": (estimates.mean().item() - exact) / se,
                "variance": variance,
                "variance_se": variance_standard_error(estimates).item(),
            }
        )
    table = pd.DataFrame(rows)
    if "iid" in set(schemes):
        table["ratio"] = table.variance / float(table.set_index("scheme").variance["iid"])
    return table
