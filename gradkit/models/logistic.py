r"""Bayesian logistic regression with a diagonal Gaussian posterior, fit by any estimator.

The model: labels :math:`y_n \in \{0, 1\}` with :math:`p(y_n = 1 \mid w) =
\mathrm{sigmoid}(x_n^\top w)` for standardised features :math:`x_n` (with a constant bias
feature) and a prior :math:`w \sim \mathcal N(0, \tau^2 I)`. Variational inference fits
:math:`q(w) = \mathcal N(m, \mathrm{diag}\,s^2)`, :math:`s = \mathrm{softplus}(\rho)`, by
maximising the evidence lower bound

.. math::
    \mathcal L(m, s) = \mathbb{E}_{q(w)}\Big[\sum_n \log p(y_n \mid x_n, w)\Big]
    - \mathrm{KL}\big(q \,\|\, \mathcal N(0, \tau^2 I)\big)

(Jaakkola and Jordan 2000; Blei, Kucukelbir and McAuliffe 2017). The KL term is analytic; the
gradient of the expected log-likelihood with respect to :math:`(m, s)` comes from the estimator
the caller names through :func:`gradkit.expectation <gradkit.autodiff.expectation>`, with
:math:`q = \mathrm{Independent}(\mathrm{Normal}(m, s), 1)`: one weight vector shared by all
data points, so the cost is one number per sample and there is no plate to declare. This is
the benchmark of Mohamed, Rosca, Figurnov and Mnih (2020, §8.3): a problem small enough that
every estimator can be run to convergence, on the breast-cancer data
(:func:`load_breast_cancer_data`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Independent, Normal

import gradkit as gk
from gradkit import _checks
from gradkit.models._baselines import measuring
from gradkit.models.training import History, fit

__all__ = [
    "BayesianLogisticRegression",
    "LogisticData",
    "gradient_estimates",
    "load_breast_cancer_data",
    "plot_training",
    "train",
]


class LogisticData(NamedTuple):
    """Features (with a leading bias column of ones) and 0/1 labels, split train/test."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor


def load_breast_cancer_data(
    test_fraction: float = 0.2,
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> LogisticData:
    r"""The Wisconsin breast-cancer data (569 tumours, 30 features) from scikit-learn.

    Split at random into training and test sets, features standardised with the training
    set's mean and standard deviation, and a constant bias feature prepended: 31 features.
    Label 1 is "benign", as scikit-learn codes it. Nothing is downloaded: the data ship with
    scikit-learn.

    Args:
        test_fraction: share of the examples held out, in ``(0, 1)``.
        seed: seed of the random split.
        dtype: floating dtype of the tensors.
        device: their device.

    Returns:
        a :class:`LogisticData` with ``train_x`` ``(N, 31)``, ``train_y`` ``(N,)`` and the same
        for the test set.

    Raises:
        ValueError: for ``test_fraction`` outside ``(0, 1)``.
        ImportError: without scikit-learn (install ``gradkit[data]``).

    Example:
        >>> from gradkit.models.logistic import load_breast_cancer_data
        >>> data = load_breast_cancer_data()
        >>> tuple(data.train_x.shape), tuple(data.test_x.shape)
        ((455, 31), (114, 31))
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    try:
        from sklearn.datasets import load_breast_cancer
    except ImportError as err:
        raise ImportError(
            "the breast-cancer data ship with scikit-learn: pip install 'gradkit[data]'"
        ) from err
    features, labels = load_breast_cancer(return_X_y=True)
    x = torch.as_tensor(features, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.float64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    num_test = round(test_fraction * len(y))
    test, train_idx = order[:num_test], order[num_test:]
    mean, std = x[train_idx].mean(0), x[train_idx].std(0)
    x = torch.cat([torch.ones(len(y), 1, dtype=x.dtype), (x - mean) / std], dim=1)

    def put(t: Tensor) -> Tensor:
        return t.to(dtype=dtype, device=device)

    return LogisticData(put(x[train_idx]), put(y[train_idx]), put(x[test]), put(y[test]))


def _inverse_softplus(value: float) -> float:
    return value + math.log(-math.expm1(-value))


class BayesianLogisticRegression(nn.Module):
    r"""Mean-field Gaussian posterior :math:`q(w) = \mathcal N(m, \mathrm{diag}\,s^2)` over weights.

    Parameters: ``loc`` :math:`m` and ``raw_scale`` :math:`\rho` with
    :math:`s = \mathrm{softplus}(\rho)`, one per feature. The prior is
    :math:`\mathcal N(0, \tau^2 I)` (Jaakkola and Jordan 2000).

    Args:
        num_features: :math:`D`, bias included.
        prior_scale: :math:`\tau > 0`.
        init_scale: initial posterior standard deviation :math:`s > 0` (means start at 0).

    Raises:
        ValueError: for a non-positive size or scale.

    Example:
        >>> import torch
        >>> from gradkit.models.logistic import BayesianLogisticRegression
        >>> model = BayesianLogisticRegression(3)
        >>> x, y = torch.randn(5, 3), torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0])
        >>> model.elbo(x, y, num_samples=4).shape
        torch.Size([])
    """

    def __init__(
        self, num_features: int, *, prior_scale: float = 1.0, init_scale: float = 0.1
    ) -> None:
        super().__init__()
        _checks.check_count("num_features", num_features)
        if not prior_scale > 0 or not init_scale > 0:
            raise ValueError(
                f"prior_scale and init_scale must be positive, got {prior_scale} and {init_scale}"
            )
        self.prior_scale = float(prior_scale)
        self.loc = nn.Parameter(torch.zeros(num_features))
        self.raw_scale = nn.Parameter(torch.full((num_features,), _inverse_softplus(init_scale)))

    @property
    def scale(self) -> Tensor:
        """The posterior standard deviations :math:`s = \\mathrm{softplus}(\\rho)`, ``(D,)``."""
        return F.softplus(self.raw_scale)

    def posterior(self) -> Independent[Normal]:
        """:math:`q(w)` as ``Independent(Normal(loc, scale), 1)`` (differentiable)."""
        return Independent(Normal(self.loc, self.scale), 1)

    @staticmethod
    def log_likelihood(weights: Tensor, features: Tensor, labels: Tensor) -> Tensor:
        r""":math:`\sum_n \log p(y_n \mid x_n, w)` for each weight vector.

        .. math:: \log p(y \mid x, w) = y\,\ell - \mathrm{softplus}(\ell),\quad \ell = x^\top w

        Args:
            weights: ``(..., D)``, any leading dimensions (samples, perturbations).
            features: ``(N, D)``.
            labels: ``(N,)`` in {0, 1}.

        Returns:
            ``(...)``: one log-likelihood per weight vector.

        Raises:
            ValueError: if the feature dimension or the number of labels does not match.
        """
        if features.shape[-1] != weights.shape[-1] or labels.shape != features.shape[:1]:
            raise ValueError(
                f"features {tuple(features.shape)} must be (N, D) with D = {weights.shape[-1]} "
                f"(the weights' last dimension) and labels (N,), got labels "
                f"{tuple(labels.shape)}"
            )
        logits = weights @ features.T
        return (labels * logits - F.softplus(logits)).sum(-1)

    def kl(self) -> Tensor:
        r"""Analytic :math:`\mathrm{KL}(q \,\|\, \mathcal N(0, \tau^2 I))`.

        .. math:: \sum_d \Big[\log\frac{\tau}{s_d} + \frac{s_d^2 + m_d^2}{2\tau^2}
           - \frac12\Big]
        """
        s, tau = self.scale, self.prior_scale
        return (math.log(tau) - torch.log(s) + (s**2 + self.loc**2) / (2 * tau**2) - 0.5).sum()

    def elbo(
        self,
        features: Tensor,
        labels: Tensor,
        num_samples: int,
        *,
        estimator: str = "pathwise",
        **options: Any,
    ) -> Tensor:
        r"""Monte Carlo ELBO whose gradient (``backward()``) is the named estimator's.

        :math:`\frac1S\sum_s \log p(y \mid X, w_s) - \mathrm{KL}`, :math:`w_s \sim q`, computed
        with :func:`gradkit.expectation <gradkit.autodiff.expectation>`.

        Args:
            features: ``(N, D)``.
            labels: ``(N,)``.
            num_samples: :math:`S`.
            estimator: ``"pathwise"``, ``"score_function"`` or ``"measure_valued"``.
            **options: the estimator's options (``baseline=`` for the score function,
                ``control_variate=`` such as :class:`gradkit.control_variates.DeltaMethod` for
                every estimator, ``coupling=`` for the measure-valued estimator,
                ``generator=``).

        Returns:
            a 0-dim tensor.
        """

        def log_lik(w: Tensor) -> Tensor:
            return self.log_likelihood(w, features, labels)

        value = gk.expectation(
            log_lik, self.posterior(), num_samples, estimator=estimator, **options
        )
        return value - self.kl()

    @torch.no_grad()
    def predict_proba(self, features: Tensor, num_samples: int = 256) -> Tensor:
        r"""Posterior predictive :math:`p(y = 1 \mid x) \approx \frac1S \sum_s
        \mathrm{sigmoid}(x^\top w_s)`, shape ``(N,)``."""
        w = self.posterior().sample((num_samples,))
        return torch.sigmoid(w @ features.T).mean(0)

    def accuracy(self, features: Tensor, labels: Tensor, num_samples: int = 256) -> float:
        """Share of labels the posterior predictive gets right (threshold 1/2)."""
        predicted = (self.predict_proba(features, num_samples) > 0.5).to(labels.dtype)
        return float((predicted == labels).to(torch.float64).mean())


def gradient_estimates(
    model: BayesianLogisticRegression,
    features: Tensor,
    labels: Tensor,
    num_samples: int,
    *,
    estimator: str = "pathwise",
    **options: Any,
) -> dict[str, Tensor]:
    r"""Per-sample estimates of :math:`\nabla_{m, s}\, \mathbb{E}_q[\log p(y \mid X, w)]`.

    Calls ``gk.ESTIMATORS[estimator]`` on the current posterior. A baseline in ``options`` is
    used without its update step (:meth:`gradkit.baselines.Baseline.update`), so measuring
    leaves a moving average as training left it.

    Returns:
        ``{"loc": (S, D), "scale": (S, D)}``.

    Example:
        >>> import torch
        >>> from gradkit.models.logistic import BayesianLogisticRegression, gradient_estimates
        >>> model = BayesianLogisticRegression(2)
        >>> x, y = torch.randn(4, 2), torch.tensor([0.0, 1.0, 1.0, 0.0])
        >>> g = gradient_estimates(model, x, y, 8, estimator="score_function")
        >>> g["loc"].shape, g["scale"].shape
        (torch.Size([8, 2]), torch.Size([8, 2]))
    """
    if estimator not in gk.ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {sorted(gk.ESTIMATORS)}")
    options = measuring(options)
    with torch.no_grad():
        q = Independent(Normal(model.loc.detach(), model.scale.detach()), 1)

    def log_lik(w: Tensor) -> Tensor:
        return model.log_likelihood(w, features, labels)

    return gk.ESTIMATORS[estimator](log_lik, q, num_samples, **options)


def train(
    data: LogisticData,
    *,
    estimator: str,
    options: Mapping[str, Any] | None = None,
    num_samples: int = 16,
    steps: int = 1000,
    lr: float = 0.01,
    eval_every: int = 50,
    eval_samples: int = 256,
    variance_samples: int = 256,
    seed: int = 0,
    progress: bool = True,
    description: str | None = None,
) -> History:
    r"""Fit :class:`BayesianLogisticRegression` to ``data`` with Adam and the named estimator.

    Every step maximises :meth:`BayesianLogisticRegression.elbo` on the full training set with
    ``num_samples`` draws (Adam, Kingma and Ba 2015), through
    :func:`gradkit.models.training.fit`. At step 0, every ``eval_every`` steps and at the end
    a record holds, besides ``step``, ``seconds`` and ``median_step_seconds``:

    * ``elbo``: the training ELBO from ``eval_samples`` pathwise draws (the same yardstick for
      every estimator);
    * ``test_accuracy``: the held-out accuracy of the posterior predictive;
    * ``loc_variance`` and ``scale_variance``: the per-sample variance of this estimator's
      gradient (with its options) w.r.t. the posterior means and standard deviations,
      averaged over the features, from ``variance_samples`` draws.

    Args:
        data: from :func:`load_breast_cancer_data`.
        estimator: ``"pathwise"``, ``"score_function"`` or ``"measure_valued"``.
        options: the estimator's options, e.g. ``{"control_variate":
            gk.control_variates.DeltaMethod()}``; a stateful baseline is updated by the
            training steps only (the variance measurements read it without updating it).
        num_samples, steps, lr: optimisation settings.
        eval_every, eval_samples, variance_samples: measurement settings.
        seed: seeds the model's sampling (initialisation is deterministic).
        progress: show a ``tqdm.auto`` progress bar.
        description: label of the progress bar.

    Returns:
        a :class:`~gradkit.models.training.History`, with the trained model as ``model``.

    Raises:
        ValueError: for an unknown estimator or non-positive counts.

    Example:
        >>> from gradkit.models.logistic import load_breast_cancer_data, train
        >>> run = train(load_breast_cancer_data(), estimator="pathwise", steps=4, eval_every=2,
        ...             progress=False)
        >>> run.steps
        [0, 2, 4]
    """
    if estimator not in gk.ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {sorted(gk.ESTIMATORS)}")
    counts = {"num_samples": num_samples, "steps": steps, "eval_samples": eval_samples}
    for name, value in {**counts, "variance_samples": variance_samples}.items():
        _checks.check_count(name, value)  # fit checks eval_every
    options = dict(options or {})
    torch.manual_seed(seed)
    x, y = data.train_x, data.train_y
    model = BayesianLogisticRegression(x.shape[1]).to(device=x.device, dtype=x.dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def step(_: int) -> None:
        loss = -model.elbo(x, y, num_samples, estimator=estimator, **options)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def evaluate(_: int) -> dict[str, float]:
        with torch.no_grad():
            measured = {
                "elbo": float(model.elbo(x, y, eval_samples)),
                "test_accuracy": model.accuracy(data.test_x, data.test_y, eval_samples),
            }
        g = gradient_estimates(model, x, y, variance_samples, estimator=estimator, **options)
        measured["loc_variance"] = float(g["loc"].var(0).mean())
        measured["scale_variance"] = float(g["scale"].var(0).mean())
        return measured

    return fit(
        step,
        evaluate,
        steps=steps,
        eval_every=eval_every,
        device=x.device,
        label=description or estimator,
        model=model,
        show="elbo",
        progress=progress,
    )


def plot_training(runs: Mapping[str, History]) -> Any:
    """Training curves side by side: ELBO, held-out accuracy, gradient variance (means, scales).

    The ELBO axis starts at the lowest value any run reaches after its first evaluation (the
    value at initialisation is far below and would flatten every curve); variances use a log
    axis.

    Args:
        runs: label -> :func:`train`'s history.

    Returns:
        the matplotlib figure (four panels).

    Example:
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> from gradkit.models.logistic import plot_training
        >>> from gradkit.models.training import History
        >>> keys = ["step", "elbo", "test_accuracy", "loc_variance", "scale_variance"]
        >>> run = History([dict(zip(keys, r)) for r in [(0, -9.0, 0.5, 2.0, 3.0),
        ...                                               (1, -5.0, 0.9, 1.0, 1.0)]])
        >>> len(plot_training({"pathwise": run}).axes)
        4
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    panels = [
        ("elbo", "training ELBO", False),
        ("test_accuracy", "held-out accuracy", False),
        ("loc_variance", "gradient variance, means", True),
        ("scale_variance", "gradient variance, scales", True),
    ]
    for ax, (key, title, log) in zip(axes, panels, strict=True):
        for label, run in runs.items():
            ax.plot(run.steps, run.column(key), label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        if log:
            ax.set_yscale("log")
    later = [v for run in runs.values() for v in run.column("elbo")[1:]]
    if later:
        low, high = min(later), max(later)
        axes[0].set_ylim(low - 0.05 * (high - low + 1.0), high + 0.05 * (high - low + 1.0))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig
