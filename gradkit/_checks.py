"""Argument checks shared by the estimators: each error names the problem and the fix."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.distributions import Distribution


def check_num_samples(num_samples: object, minimum: int = 1, why: str = "") -> int:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int):
        raise TypeError(
            f"num_samples must be a Python int, got {type(num_samples).__name__} "
            f"({num_samples!r}); pass e.g. num_samples=100"
        )
    if num_samples < minimum:
        reason = f" ({why})" if why else ""
        raise ValueError(
            f"num_samples must be at least {minimum}{reason}, got {num_samples}; "
            f"draw more samples per estimate"
        )
    return num_samples


def check_count(name: str, value: object, minimum: int = 1) -> int:
    """``value`` as an int of at least ``minimum`` (a step count, a batch size, ...)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int of at least {minimum}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return value


def check_distribution(dist: object) -> Distribution:
    if not isinstance(dist, Distribution):
        raise TypeError(
            f"dist must be a torch.distributions.Distribution, got {type(dist).__name__}; "
            "build one, e.g. torch.distributions.Normal(loc, scale)"
        )
    return dist


def evaluate(f: Callable[[Tensor], Tensor], x: Tensor, lead: tuple[int, ...]) -> Tensor:
    """Call ``f`` on samples whose leading dimensions are ``lead``; check what comes back.

    ``f`` must return a floating tensor whose shape starts with ``lead`` (one value, or one
    tensor of values, per sample) and that holds no NaN or inf.
    """
    if not callable(f):
        raise TypeError(f"f must be callable (samples -> values), got {type(f).__name__}")
    fx = f(x)
    if not isinstance(fx, Tensor):
        raise TypeError(
            f"f must return a torch.Tensor of shape (num_samples, *T), got "
            f"{type(fx).__name__}; wrap the result with torch.as_tensor"
        )
    if tuple(fx.shape[: len(lead)]) != tuple(lead):
        raise ValueError(
            f"f returned shape {tuple(fx.shape)} for samples of shape {tuple(x.shape)}; it must "
            f"return one value per sample, shape ({', '.join(map(str, lead))}, *T). Do not "
            "reduce over the sample dimension (the estimator averages), and let f broadcast "
            "over leading sample dimensions"
        )
    if not fx.is_floating_point():
        fx = fx.to(x.dtype if x.is_floating_point() else torch.get_default_dtype())
    # One reduction decides: a sum of finite values is finite unless it overflows, and only
    # then (or for a real NaN/inf) is every element checked.
    if not math.isfinite(float(fx.detach().sum())) and not bool(torch.isfinite(fx).all()):
        bad = ~torch.isfinite(fx.detach())
        count = int(bad.reshape(*lead, -1).any(-1).sum())
        total = int(torch.tensor(lead).prod())
        raise ValueError(
            f"f returned NaN or inf for {count} of {total} samples; the gradient estimate "
            "would be NaN. Check f on the support of the distribution (log of zero, division "
            "by zero, overflow) or clamp its output"
        )
    return fx
