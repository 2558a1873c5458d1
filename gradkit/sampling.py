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

Holding the draws *fixed* is the third idea: :func:`common_random_numbers` turns a Monte
Carlo computation into a deterministic function of its parameters, so that it can be
differentiated and optimised like any other (its docstring says what that gradient estimates
and when it is biased).

Both schemes make the rows of one estimate dependent, so the variance of a scheme is the variance of
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

__all__ = ["SCHEMES", "common_random_numbers", "compare_schemes", "normal_noise"]

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


def _global_states() -> list[Tensor]:
    """The states of torch's global generators: the CPU's and every initialised CUDA device's."""
    states = [torch.random.get_rng_state()]
    if torch.cuda.is_initialized():
        states += torch.cuda.get_rng_state_all()
    return states


def common_random_numbers(
    fn: Callable[..., Any], seed: int, *, device: torch.device | str | None = None
) -> Callable[..., Any]:
    r"""Hold the random numbers of a Monte Carlo computation fixed across calls.

    Returns ``g`` with ``g(*args, **kwargs) = fn(*args, generator=G, **kwargs)``, where ``G``
    is a new :class:`torch.Generator` on ``device`` seeded with ``seed`` at every call: every
    call sees the same stream of draws (*common random numbers*), so ``g`` is a deterministic
    function of its arguments that autograd differentiates and an optimiser can minimise.
    ``fn`` must take every draw from the generator it is given (``torch.randn(...,
    generator=generator)``, ``gk.pathwise(..., generator=generator)``, the samplers of
    :mod:`gradkit.sampling`); a call that moves torch's global generators (the CPU's, or an
    initialised CUDA device's) raises, because those draws would not be held fixed. The one
    draw it cannot see is on a CUDA device whose context the call itself creates.

    **What the gradient estimates.** For fixed draws :math:`u`, autograd returns
    :math:`\nabla_\theta \hat S(\theta; u)`, the derivative of the algorithm's output along
    the path of its samples: a pathwise estimator. Its mean is :math:`\nabla_\theta
    \mathbb{E}_u[\hat S(\theta; u)]` when :math:`\hat S` is differentiable in
    :math:`\theta` for almost every :math:`u` and dominated by an integrable Lipschitz bound
    (Glasserman 2003, §7.2). Minimising :math:`\hat S(\cdot; u)` for one fixed :math:`u`
    (sample-average approximation) gives a minimiser that is consistent as the number of draws
    grows, with an error of order :math:`1/\sqrt n`.

    **When it is biased.** When the output jumps as :math:`\theta` moves a sample across a
    boundary (an indicator or a step of the cost, an accept/reject decision, an argmax or
    sort, a count, a sampler whose number of draws depends on :math:`\theta` so the stream
    shifts), the derivative of each piece misses the jumps' contribution: it is zero for a
    piecewise-constant output and biased in general. Nothing here can detect a jump; the
    book's comparison chapter measures one such bias.

    Args:
        fn: the Monte Carlo computation; it takes a keyword argument ``generator``.
        seed: the seed of every call's generator.
        device: the generator's device (that of the draws ``fn`` makes); default CPU.

    Returns:
        the function ``g``.

    Raises:
        TypeError: if ``fn`` is not callable or ``seed`` not an int.
        RuntimeError: (from ``g``) when a call of ``fn`` draws from torch's global generator.

    Example:
        >>> import torch, gradkit as gk
        >>> def estimate(theta, generator):  # E[(theta + eps)^2] by 4 draws
        ...     eps = torch.randn(4, generator=generator, dtype=torch.float64)
        ...     return ((theta + eps) ** 2).mean()
        >>> g = gk.sampling.common_random_numbers(estimate, seed=0)
        >>> theta = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        >>> bool(g(theta) == g(theta))  # the same draws at every call
        True
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    where = torch.device("cpu" if device is None else device)

    def with_fixed_draws(*args: Any, **kwargs: Any) -> Any:
        if "generator" in kwargs:
            raise TypeError(
                "common_random_numbers passes generator= itself; do not pass one to the call"
            )
        generator = torch.Generator(device=where).manual_seed(seed)
        before = _global_states()
        out = fn(*args, generator=generator, **kwargs)
        after = _global_states()
        # a CUDA context created within the call adds states that cannot be compared
        if any(not torch.equal(a, b) for a, b in zip(before, after, strict=False)):
            raise RuntimeError(
                "fn drew from torch's global random number generator, whose draws are not held "
                "fixed between calls: pass generator=generator to every draw in fn "
                "(torch.randn(..., generator=generator), gradkit's estimators and samplers); "
                "torch.distributions' sample() and rsample() always use the global generator"
            )
        return out

    return with_fixed_draws
