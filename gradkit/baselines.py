r"""Baselines for the score-function estimator.

The score has mean zero, :math:`\mathbb{E}[\nabla_\theta\log p(x;\theta)] = 0`, so for any
:math:`b` that does not depend on the sample :math:`x_s` itself,

.. math::
    \hat g_s = (f(x_s) - b)\,\nabla_\theta \log p(x_s;\theta)

is still unbiased, and a good :math:`b` cuts its variance (Williams 1992; Greensmith, Bartlett
and Baxter 2004; Mohamed et al. 2020, §7.4). A baseline here is called with the *learning
signal* ``signal`` of shape ``(S, *B)`` — ``f`` per batch element under a declared plate
(``plate=True``, ``B = batch_shape``), otherwise summed over ``f``'s outputs (``B = ()``) —
and the per-sample scores,
and returns ``b`` of the same shape as ``signal``, or a dict of per-parameter baselines shaped
like the scores. Pass one as ``gk.score_function(..., baseline=...)``.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping

import torch
from torch import Tensor, nn

__all__ = [
    "Baseline",
    "Constant",
    "ExponentialMovingAverage",
    "LearnedBaseline",
    "LeaveOneOut",
    "OptimalConstant",
]


def _need_two(signal: Tensor, what: str) -> None:
    if signal.shape[0] < 2:
        raise ValueError(
            f"{what} needs at least 2 samples per estimate (each sample's baseline is built "
            f"from the others), got num_samples={signal.shape[0]}; draw 2 or more samples"
        )


class Baseline(abc.ABC):
    """A baseline :math:`b` subtracted from the learning signal of the score-function estimator.

    State is explicit: :meth:`value` computes the baseline for the current samples and never
    changes the baseline; :meth:`update` folds the current signal into a stateful baseline
    (a moving average) and is called once per estimator call, *after* the value was used, by
    ``gk.score_function`` and ``gk.expectation``. So the baseline a sample sees never contains
    that sample, and evaluating a baseline (for a variance measurement, say) needs no copy.
    Subclasses implement :meth:`value` (and :meth:`update` when they keep state); calling the
    baseline checks the shape of what :meth:`value` returns. A baseline that needs the
    per-sample scores sets :attr:`needs_scores`: they cost a copy of every parameter per
    sample, ``S x parameter size``.
    """

    #: whether :meth:`value` reads the per-sample scores (otherwise it receives ``{}``)
    needs_scores: bool = False

    @abc.abstractmethod
    def value(self, signal: Tensor, scores: Mapping[str, Tensor]) -> Tensor | dict[str, Tensor]:
        """The baseline for each sample: a tensor broadcastable to ``signal``, or a dict."""

    def update(self, signal: Tensor) -> None:  # noqa: B027 (stateless baselines keep no state)
        """Fold this call's signal into the baseline's state (stateless baselines: nothing)."""

    def __call__(self, signal: Tensor, scores: Mapping[str, Tensor]) -> Tensor | dict[str, Tensor]:
        b = self.value(signal, scores)
        if isinstance(b, dict):
            if not self.needs_scores:
                raise TypeError(
                    f"{type(self).__name__} returned per-parameter baselines (a dict) but does "
                    "not declare needs_scores = True; set it on the class, so that the "
                    "estimator passes the per-sample scores the dict is aligned with"
                )
            missing = sorted(set(scores) - set(b))
            if missing:
                raise ValueError(
                    f"{type(self).__name__} returned per-parameter baselines without "
                    f"{missing}; return one tensor for each of {sorted(scores)}"
                )
            out = {}
            for name, s in scores.items():
                value = torch.as_tensor(b[name], dtype=s.dtype, device=s.device).detach()
                try:
                    out[name] = value.expand_as(s)
                except RuntimeError:
                    raise ValueError(
                        f"{type(self).__name__} returned a baseline of shape "
                        f"{tuple(value.shape)} for parameter {name!r}, which does not "
                        f"broadcast to its per-sample scores' shape {tuple(s.shape)}"
                    ) from None
            return out
        if isinstance(b, Tensor) and b.shape == signal.shape and b.dtype == signal.dtype:
            return b.detach()
        b = torch.as_tensor(b, dtype=signal.dtype, device=signal.device).detach()
        try:
            return b.expand_as(signal)
        except RuntimeError:
            raise ValueError(
                f"{type(self).__name__} returned a baseline of shape {tuple(b.shape)}, which "
                f"does not broadcast to the learning signal's shape {tuple(signal.shape)} "
                "(num_samples, *batch_shape under a plate, or num_samples); give one value "
                "per batch element or a scalar"
            ) from None


class Constant(Baseline):
    r"""A fixed baseline :math:`b` (a number, or a tensor broadcastable to ``(S, *B)``).

    A tensor computed elsewhere — e.g. the prediction of a :class:`LearnedBaseline` for each
    document in a batch — is a constant as far as the estimator is concerned (it is detached).

    Example:
        >>> import torch, gradkit as gk
        >>> gk.baselines.Constant(0.5)(torch.zeros(3), {})
        tensor([0.5000, 0.5000, 0.5000])
    """

    def __init__(self, value: float | Tensor) -> None:
        if not isinstance(value, (int, float, Tensor)) or isinstance(value, bool):
            raise TypeError(
                f"a constant baseline must be a number or a tensor, got {type(value).__name__}; "
                "pass a gradkit.baselines.Baseline instance for adaptive baselines, and for a "
                "LearnedBaseline its prediction, learned(inputs)"
            )
        self.constant = value

    def value(self, signal: Tensor, scores: Mapping[str, Tensor]) -> Tensor:
        return torch.as_tensor(self.constant, dtype=signal.dtype, device=signal.device)


class ExponentialMovingAverage(Baseline):
    r"""An exponential moving average of past learning signals (Williams 1992).

    .. math:: \bar f_t = \beta_t \bar f_{t-1} + (1-\beta_t)\,\mathrm{mean}(f_t), \qquad
       b_t = \bar f_{t-1} \;\big/\; \big(1 - \textstyle\prod_{u<t} \beta_u\big)

    :meth:`value` returns the average of *earlier* calls (zero before the first update), so
    it is independent of the current samples and the estimate stays unbiased; :meth:`update`
    adds the current call's mean signal. With ``zero_debias`` (the default) the average is
    divided by one minus the product of the decays, as in Adam (Kingma and Ba 2015), so early
    values are not pulled towards zero and a constant signal gives that constant from the first
    update on. (optax's ``moving_avg_baseline`` agrees on the first update; later it divides
    the stored, already debiased value again by :math:`1 - \beta_t^{t+1}`, which inflates a
    constant signal.) With
    ``early_training`` the decay is :math:`\beta_t = \min(\beta, (1+t)/(10+t))`, optax's
    heuristic that averages over few steps while there is little history.

    Args:
        decay: :math:`\beta \in [0, 1)`.
        zero_debias: divide out the zero initialisation's bias.
        early_training: use the smaller decay :math:`(1+t)/(10+t)` early on.
        per_element: keep one average per batch element (when every step sees the same batch
            elements, under a declared plate); by default one scalar average over all of them.

    Example:
        >>> import torch, gradkit as gk
        >>> ema = gk.baselines.ExponentialMovingAverage(decay=0.5)
        >>> ema(torch.full((4,), 2.0), {})  # no history yet
        tensor([0., 0., 0., 0.])
        >>> ema.update(torch.full((4,), 2.0))
        >>> ema(torch.full((4,), 4.0), {})  # the debiased average of the first call
        tensor([2., 2., 2., 2.])
    """

    def __init__(
        self,
        decay: float = 0.9,
        *,
        zero_debias: bool = True,
        early_training: bool = False,
        per_element: bool = False,
    ) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
            raise ValueError(
                f"decay must be a number in [0, 1), got {decay!r}; values near 1 (e.g. 0.9) "
                "average over more past steps"
            )
        for flag, label in ((zero_debias, "zero_debias"), (early_training, "early_training")):
            if not isinstance(flag, bool):
                raise TypeError(f"{label} must be True or False, got {flag!r}")
        self.decay = float(decay)
        self.zero_debias = zero_debias
        self.early_training = early_training
        self.per_element = per_element
        self.average: Tensor | None = None
        self.steps = 0
        self.weight = 0.0  # 1 - prod of the decays used so far: the average's total weight

    def _current(self, signal: Tensor) -> Tensor:
        return signal.detach().mean(0) if self.per_element else signal.detach().mean()

    def value(self, signal: Tensor, scores: Mapping[str, Tensor]) -> Tensor:
        current = self._current(signal)
        if self.average is None or self.steps == 0:
            return torch.zeros_like(current)
        if self.average.shape != current.shape:
            raise ValueError(
                f"the moving average has shape {tuple(self.average.shape)} but this call's "
                f"signal averages to {tuple(current.shape)}; per_element=True needs the same "
                "batch elements every call"
            )
        average = self.average.to(current)
        return average / self.weight if self.zero_debias else average

    def update(self, signal: Tensor) -> None:
        current = self._current(signal)
        decay = self.decay
        if self.early_training:
            decay = min(decay, (1.0 + self.steps) / (10.0 + self.steps))
        if self.average is None:
            self.average = torch.zeros_like(current)
        self.average = decay * self.average.to(current) + (1.0 - decay) * current
        self.weight = decay * self.weight + (1.0 - decay)
        self.steps += 1


class LeaveOneOut(Baseline):
    r"""Leave-one-out baseline (RLOO; Kool, van Hoof and Welling 2019; Mnih and Rezende 2016).

    Each sample's baseline is the mean of the *other* samples' signals,

    .. math:: b_s = \frac{1}{S-1}\sum_{s' \ne s} f(x_{s'}),

    which is independent of :math:`x_s`, so the estimator stays unbiased. Needs ``S >= 2``.

    Example:
        >>> import torch, gradkit as gk
        >>> gk.baselines.LeaveOneOut()(torch.tensor([1.0, 2.0, 6.0]), {})
        tensor([4.0000, 3.5000, 1.5000])
    """

    def value(self, signal: Tensor, scores: Mapping[str, Tensor]) -> Tensor:
        _need_two(signal, "the leave-one-out baseline")
        return (signal.sum(0, keepdim=True) - signal) / (signal.shape[0] - 1)


class OptimalConstant(Baseline):
    r"""The variance-minimising constant baseline, one per parameter element.

    For the estimate :math:`(f - b)\,s` of a scalar parameter with score :math:`s`, the
    variance is minimised by :math:`b^\star = \mathbb{E}[s^2 f] / \mathbb{E}[s^2]`
    (Greensmith et al. 2004; Mohamed et al. 2020, §7.4). It needs each sample's own score,
    which :func:`gradkit.estimators.score` computes with ``torch.func``. To keep the estimate
    unbiased,
    sample :math:`s` uses :math:`b^\star` estimated from the other samples (leave-one-out).
    Needs ``S >= 2``. It needs the per-sample scores: a copy of every parameter per sample,
    ``S x parameter size`` in memory and time (the other baselines need only the signal).
    """

    needs_scores = True

    def value(self, signal: Tensor, scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
        _need_two(signal, "the optimal constant baseline")
        out = {}
        batch_ndim = signal.dim() - 1
        for name, s in scores.items():
            f = signal.reshape(*signal.shape, *([1] * (s.dim() - 1 - batch_ndim)))
            s2 = s.pow(2)
            num = (s2 * f).sum(0, keepdim=True) - s2 * f
            den = s2.sum(0, keepdim=True) - s2
            out[name] = torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))
        return out


class LearnedBaseline(nn.Module):
    r"""An input-dependent baseline :math:`C_\omega(x)` trained by L2 regression onto the signal.

    A neural network of the *observed input* (a document, an image, a state), never of the
    sampled latent, predicts the learning signal; it is trained by minimising
    :math:`(C_\omega(x) - f)^2` alongside the model (Mnih and Gregor 2014). Its prediction is
    passed to the estimator as a constant baseline, e.g.
    ``gk.expectation(f, q, S, estimator="score_function", baseline=c)`` with
    ``c = learned(x)``; add ``learned.loss(c, value)`` to the training loss.

    Args:
        net: a module mapping inputs ``(*B, ...)`` to one prediction per input, shape ``(*B,)``
            or ``(*B, 1)``.

    Example:
        >>> import torch, gradkit as gk
        >>> c = gk.baselines.LearnedBaseline(torch.nn.Linear(3, 1))
        >>> pred = c(torch.zeros(5, 3))
        >>> pred.shape, c.loss(pred, torch.ones(5)).dim()
        (torch.Size([5]), 0)
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, inputs: Tensor) -> Tensor:
        out = self.net(inputs)
        return out.squeeze(-1) if out.dim() > 1 and out.shape[-1] == 1 else out

    @staticmethod
    def loss(prediction: Tensor, target: Tensor) -> Tensor:
        """Mean squared error between the prediction and the (detached) learning signal."""
        return (prediction - target.detach()).pow(2).mean()
