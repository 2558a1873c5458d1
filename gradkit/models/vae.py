r"""A variational autoencoder for binary images, trainable with any of gradkit's estimators.

The model (Kingma and Welling 2014; Rezende, Mohamed and Wierstra 2014) has a standard normal
prior :math:`p(z) = \mathcal N(0, I)`, a Bernoulli decoder
:math:`p_\theta(x \mid z) = \prod_j \mathrm{Bernoulli}(x_j;\ \mathrm{sigmoid}(\ell_j(z)))` and a
diagonal Gaussian encoder :math:`q_\phi(z \mid x) = \mathcal N(\mu_\phi(x), \mathrm{diag}\,
\sigma_\phi(x)^2)`; both networks are two-layer MLPs. It maximises the evidence lower bound

.. math::
    \mathcal L(x) = \mathbb E_{q_\phi(z\mid x)}[\log p_\theta(x\mid z)]
    - \mathrm{KL}(q_\phi(z\mid x)\,\|\,p(z)).

The KL term is analytic. The gradient of the reconstruction term with respect to the encoder
outputs :math:`(\mu, \sigma)` is a Monte Carlo estimate from the estimator the caller names
(``"pathwise"``, ``"score_function"``, ``"measure_valued"`` or any other name in
``gk.ESTIMATORS``), through :func:`gradkit.expectation <gradkit.autodiff.expectation>` with
:math:`q = \mathrm{Independent}(\mathrm{Normal}(\mu, \sigma), 1)` and the cost
:math:`f(z) = \log p_\theta(x\mid z)` returning one value per sample and data point, declared
with ``plate=True``: each data point's encoder outputs are credited with its own term only, and
the measure-valued estimator costs :math:`1 + 3 \dim z` decoder evaluations per data point
with coupling, :math:`1 + 4 \dim z` without, batched over the whole mini-batch. The decoder
always gets its ordinary gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Independent, Normal, kl_divergence

import gradkit as gk
from gradkit import _checks
from gradkit.models._baselines import measuring
from gradkit.models.training import History, fit

__all__ = [
    "VAE",
    "elbo",
    "evaluate_elbo",
    "latent_gradient_estimates",
    "train_vae",
    "training_step",
]


class VAE(nn.Module):
    r"""Variational autoencoder with a Gaussian encoder and a Bernoulli decoder.

    Encoder: :math:`h = \mathrm{ReLU}(W_1 x + b_1)`, :math:`\mu = W_{21} h + b_{21}`,
    :math:`\log\sigma^2 = W_{22} h + b_{22}`. Decoder: :math:`\ell(z) = W_4\,\mathrm{ReLU}(W_3 z
    + b_3) + b_4`, the logits of the pixel probabilities. The layout is the PyTorch VAE
    example's (Kingma and Welling 2014, ``kingma2014auto``).

    The model counts its decoder evaluations in ``decoded``: the number of latent vectors
    :math:`z` passed through :meth:`decode` (set it to 0 to start a count). This is the cost
    measure of the estimators: 1 per sample for the pathwise and score-function estimators,
    :math:`1 + 3\dim z` (coupled) or :math:`1 + 4\dim z` (uncoupled) for the measure-valued one.

    Args:
        x_dim: number of pixels per image (784 for MNIST).
        hidden_dim: width of the hidden layer of both networks.
        z_dim: number of latent dimensions.

    Raises:
        ValueError: if a size is not a positive int.

    Example:
        >>> import torch, gradkit.models
        >>> vae = gradkit.models.VAE(x_dim=64, hidden_dim=32, z_dim=3)
        >>> mu, std = vae.encode(torch.zeros(5, 64))
        >>> mu.shape, bool((std > 0).all())
        (torch.Size([5, 3]), True)
        >>> vae.decode(torch.zeros(7, 5, 3)).shape  # leading sample dimensions broadcast
        torch.Size([7, 5, 64])
        >>> vae.decoded
        35
    """

    def __init__(self, x_dim: int = 784, hidden_dim: int = 400, z_dim: int = 20) -> None:
        super().__init__()
        self.x_dim = _checks.check_count("x_dim", x_dim)
        self.hidden_dim = _checks.check_count("hidden_dim", hidden_dim)
        self.z_dim = _checks.check_count("z_dim", z_dim)
        self.fc1 = nn.Linear(x_dim, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, z_dim)
        self.fc22 = nn.Linear(hidden_dim, z_dim)
        self.fc3 = nn.Linear(z_dim, hidden_dim)
        self.fc4 = nn.Linear(hidden_dim, x_dim)
        self.decoded = 0

    def _check_last(self, t: Tensor, size: int, what: str) -> None:
        if t.dim() < 1 or t.shape[-1] != size:
            raise ValueError(
                f"{what} must have last dimension {size}, got shape {tuple(t.shape)}; "
                f"flatten images to rows of {self.x_dim} pixels and latents to {self.z_dim} values"
            )

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        r"""Mean and standard deviation of :math:`q_\phi(z \mid x)`, each of shape ``(*B, z_dim)``.

        Args:
            x: images, shape ``(*B, x_dim)``.

        Raises:
            ValueError: if the last dimension of ``x`` is not ``x_dim``.
        """
        self._check_last(x, self.x_dim, "x")
        h = F.relu(self.fc1(x))
        return self.fc21(h), torch.exp(0.5 * self.fc22(h))

    def decode(self, z: Tensor) -> Tensor:
        r"""Bernoulli logits :math:`\ell(z)` of the pixels, shape ``(*lead, x_dim)``.

        Args:
            z: latents, shape ``(*lead, z_dim)``; any leading dimensions (samples, batch,
                a measure-valued estimator's perturbations) broadcast.

        Raises:
            ValueError: if the last dimension of ``z`` is not ``z_dim``.
        """
        self._check_last(z, self.z_dim, "z")
        self.decoded += z.numel() // self.z_dim
        return self.fc4(F.relu(self.fc3(z)))

    def posterior(self, x: Tensor) -> Independent[Normal]:
        r""":math:`q_\phi(z\mid x)` as ``Independent(Normal(mu, std), 1)``, batch shape ``B``."""
        mu, std = self.encode(x)
        return Independent(Normal(mu, std), 1)

    def prior(self) -> Independent[Normal]:
        r""":math:`p(z) = \mathcal N(0, I)` on the model's device and dtype."""
        zeros = self.fc3.weight.new_zeros(self.z_dim)
        return Independent(Normal(zeros, torch.ones_like(zeros)), 1)

    def log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        r""":math:`\log p_\theta(x\mid z) = \sum_j x_j \ell_j - \log(1 + e^{\ell_j})`.

        Args:
            x: binary images, shape ``(B, x_dim)``.
            z: latents, shape ``(*lead, B, z_dim)``.

        Returns:
            log-likelihoods of shape ``(*lead, B)`` (one per sample and data point).
        """
        self._check_last(x, self.x_dim, "x")
        logits = self.decode(z)
        return (x * logits - F.softplus(logits)).sum(-1)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        r"""Pixel probabilities :math:`\mathrm{sigmoid}(\ell(\mu_\phi(x)))`, shape of ``x``."""
        return torch.sigmoid(self.decode(self.encode(x)[0]))

    @torch.no_grad()
    def sample(self, num_images: int, generator: torch.Generator | None = None) -> Tensor:
        r"""Pixel probabilities :math:`\mathrm{sigmoid}(\ell(z))` at :math:`z \sim p(z)`.

        Args:
            num_images: how many images, shape ``(num_images, x_dim)``.
            generator: optional random generator (on the model's device) for the latents.
        """
        _checks.check_num_samples(num_images)
        w = self.fc3.weight
        z = torch.randn(num_images, self.z_dim, generator=generator, dtype=w.dtype, device=w.device)
        return torch.sigmoid(self.decode(z))


def elbo(
    model: VAE, x: Tensor, *, estimator: str = "pathwise", num_samples: int = 1, **options: Any
) -> Tensor:
    r"""Per-data-point ELBO estimates whose gradient uses the named estimator for the encoder.

    .. math::
        \hat{\mathcal L}(x_b) = \frac1S\sum_{s=1}^S \log p_\theta(x_b\mid z_{s,b})
        - \mathrm{KL}(q_\phi(z\mid x_b)\,\|\,\mathcal N(0, I)),
        \qquad z_{s,b}\sim q_\phi(z\mid x_b).

    ``backward()`` gives the decoder its ordinary gradient, the encoder the analytic KL gradient
    plus the chosen estimator's estimate of :math:`\nabla_{\mu,\sigma}\mathbb E_q[\log
    p_\theta(x\mid z)]` through :func:`gradkit.expectation <gradkit.autodiff.expectation>` with
    ``plate=True`` (one term per data point, each depending only on its own :math:`z_b`).

    Args:
        model: the VAE.
        x: binary images, shape ``(B, x_dim)``.
        estimator: ``"pathwise"``, ``"score_function"`` or ``"measure_valued"``.
        num_samples: samples ``S`` of :math:`z` per data point.
        **options: passed to the estimator (``baseline=`` for the score function,
            ``coupling=`` for the measure-valued estimator, ``control_variate=``,
            ``generator=``).

    Returns:
        a tensor of shape ``(B,)``.

    Raises:
        ValueError: for an unknown estimator or a wrong image size; TypeError for an option
            the estimator does not take.

    Reference: Kingma and Welling (2014), ``kingma2014auto``; Mohamed et al. (2020),
    ``mohamed2020monte``.

    Example:
        >>> import torch, gradkit.models
        >>> vae = gradkit.models.VAE(x_dim=64, hidden_dim=32, z_dim=3)
        >>> x = torch.bernoulli(torch.full((4, 64), 0.3))
        >>> loss = -gradkit.models.elbo(vae, x, estimator="measure_valued").mean()
        >>> loss.backward()
        >>> vae.fc1.weight.grad.shape
        torch.Size([32, 64])
    """
    q = model.posterior(x)
    reconstruction = gk.expectation(
        lambda z: model.log_likelihood(x, z),
        q,
        num_samples,
        estimator=estimator,
        plate=True,
        **options,
    )
    return reconstruction - kl_divergence(q, model.prior())


@torch.no_grad()
def evaluate_elbo(
    model: VAE, data: Tensor, *, num_samples: int = 1, batch_size: int = 1000
) -> float:
    r"""Mean ELBO over a data set, in nats per image: :math:`\frac1N\sum_n \hat{\mathcal L}(x_n)`.

    The reconstruction term is averaged over ``num_samples`` draws of :math:`z` per image;
    the KL term is exact.

    Args:
        model: the VAE.
        data: binary images, shape ``(N, x_dim)``.
        num_samples: draws of :math:`z` per image.
        batch_size: images per forward pass (memory, not the result).

    Returns:
        the mean ELBO (a Python float; higher is better).

    Raises:
        ValueError: for a non-positive ``num_samples`` or ``batch_size`` or a wrong image size.

    Reference: Kingma and Welling (2014), ``kingma2014auto``.

    Example:
        >>> import torch, gradkit.models
        >>> vae = gradkit.models.VAE(x_dim=64, hidden_dim=32, z_dim=3)
        >>> value = gradkit.models.evaluate_elbo(vae, torch.zeros(10, 64))
        >>> -64 < value < 0  # an untrained decoder has logits near 0: about -64 log 2
        True
    """
    _checks.check_num_samples(num_samples)
    _checks.check_num_samples(batch_size)
    total = 0.0
    for chunk in data.split(batch_size):
        q = model.posterior(chunk)
        z = q.sample((num_samples,))
        value = model.log_likelihood(chunk, z).mean(0) - kl_divergence(q, model.prior())
        total += float(value.sum())
    return total / len(data)


def training_step(
    model: VAE,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    *,
    estimator: str = "pathwise",
    num_samples: int = 1,
    **options: Any,
) -> float:
    r"""One Adam step on :math:`-\frac1B\sum_b \hat{\mathcal L}(x_b)`; returns the mean ELBO.

    Args:
        model: the VAE.
        optimizer: an optimizer over ``model.parameters()``.
        x: a mini-batch of binary images, shape ``(B, x_dim)``.
        estimator: the estimator for the encoder's reconstruction gradient.
        num_samples: samples of :math:`z` per image.
        **options: passed to the estimator.

    Raises:
        ValueError: for an unknown estimator or a wrong image size; TypeError for an option
            the estimator does not take.

    Reference: Kingma and Welling (2014), ``kingma2014auto``; Kingma and Ba (2015),
    ``kingma2015adam``.

    Example:
        >>> import torch, gradkit.models
        >>> vae = gradkit.models.VAE(x_dim=64, hidden_dim=32, z_dim=3)
        >>> opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
        >>> x = torch.bernoulli(torch.full((8, 64), 0.3))
        >>> value = gradkit.models.training_step(vae, opt, x, estimator="score_function")
        >>> isinstance(value, float)
        True
    """
    optimizer.zero_grad(set_to_none=True)
    value = elbo(model, x, estimator=estimator, num_samples=num_samples, **options).mean()
    (-value).backward()
    optimizer.step()
    return float(value.detach())


def train_vae(
    model: VAE,
    train: Tensor,
    *,
    test: Tensor | None = None,
    estimator: str = "pathwise",
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    num_samples: int = 1,
    seed: int = 0,
    progress: bool = True,
    **options: Any,
) -> History:
    r"""Train ``model`` with Adam on the negative ELBO, using ``estimator`` for the encoder.

    Each epoch visits the training images once in a random order (fixed by ``seed``) in
    mini-batches of ``batch_size`` and takes one :func:`training_step` per batch;
    :func:`gradkit.models.training.fit` runs the steps. Before training and after every epoch
    a record holds, besides ``step``, ``seconds`` (training time so far) and
    ``median_step_seconds`` (the median time of the epoch's steps: unlike the total, it is not
    moved by a burst of load from other processes on a shared machine), the ``epoch`` and the
    mean ELBO (:func:`evaluate_elbo`) on the training set (``train_elbo``) and on ``test``
    (``test_elbo``, NaN without ``test``). A ``tqdm.auto`` progress bar shows the steps.

    Args:
        model: the VAE (trained in place).
        train: training images, shape ``(N, x_dim)``.
        test: held-out images, or ``None``.
        estimator: ``"pathwise"``, ``"score_function"`` or ``"measure_valued"``.
        epochs: passes over the training set.
        batch_size: images per step.
        lr: Adam's learning rate (Kingma and Ba 2015, ``kingma2015adam``).
        num_samples: samples of :math:`z` per image and step.
        seed: seed of the mini-batch order.
        progress: show the progress bar.
        **options: passed to the estimator (e.g. ``baseline=gk.baselines.LeaveOneOut()``).

    Returns:
        a :class:`~gradkit.models.training.History`, one record per epoch (epoch 0 is before
        training), with the model as ``model``.

    Raises:
        ValueError: for a bad size, no training images or an unknown estimator.

    Example:
        >>> import torch, gradkit.models
        >>> vae = gradkit.models.VAE(x_dim=64, hidden_dim=32, z_dim=3)
        >>> x = torch.bernoulli(torch.full((64, 64), 0.3))
        >>> history = gradkit.models.train_vae(vae, x, epochs=2, batch_size=32, progress=False)
        >>> history.column("epoch"), history.steps
        ([0, 1, 2], [0, 2, 4])
    """
    if estimator not in gk.ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {sorted(gk.ESTIMATORS)}")
    _checks.check_count("epochs", epochs, minimum=0)
    _checks.check_count("batch_size", batch_size)
    if len(train) == 0:
        raise ValueError("train holds no images; pass at least one")
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-len(train) // batch_size)
    batches: list[Tensor] = []

    def step(i: int) -> None:
        if (i - 1) % steps_per_epoch == 0:  # a new epoch: a new order of the images
            order = torch.randperm(len(train), generator=generator).to(train.device)
            batches[:] = order.split(batch_size)
        index = batches[(i - 1) % steps_per_epoch]
        training_step(
            model, optimizer, train[index], estimator=estimator, num_samples=num_samples, **options
        )

    def evaluate(i: int) -> dict[str, float]:
        return {
            "epoch": i // steps_per_epoch,
            "train_elbo": evaluate_elbo(model, train),
            "test_elbo": evaluate_elbo(model, test) if test is not None else float("nan"),
        }

    return fit(
        step,
        evaluate,
        steps=epochs * steps_per_epoch,
        eval_every=steps_per_epoch,
        device=train.device,
        label=estimator,
        model=model,
        show="train_elbo",
        progress=progress,
    )


def latent_gradient_estimates(
    model: VAE,
    x: Tensor,
    *,
    estimator: str,
    num_samples: int = 1,
    repeats: int = 1,
    **options: Any,
) -> dict[str, Tensor]:
    r"""Independent estimates of :math:`\nabla_{\mu,\sigma}\,\mathbb E_{q}[\log p_\theta(x\mid z)]`.

    The gradient of the reconstruction term with respect to the encoder's outputs, which the
    encoder's weights receive through the chain rule; its spread across repeats is the
    estimator's noise. Each repeat is one training step's estimate (the mean of ``num_samples``
    per-sample estimates); the repeats run in one vectorised call by adding a leading batch
    dimension of size ``repeats`` to :math:`q`, declared a plate with the data points
    (``plate=True``). A baseline in ``options`` is read but not updated.

    Args:
        model: the VAE (its parameters are not changed).
        x: images, shape ``(B, x_dim)``.
        estimator: ``"pathwise"``, ``"score_function"`` or ``"measure_valued"``.
        num_samples: samples per estimate.
        repeats: number of independent estimates ``R``.
        **options: passed to the estimator.

    Returns:
        dict ``{"loc": (R, B, z_dim), "scale": (R, B, z_dim)}``.

    Raises:
        ValueError: for an unknown estimator or a non-positive ``repeats``.

    Reference: Mohamed, Rosca, Figurnov and Mnih (2020), ``mohamed2020monte``.

    Example:
        >>> import torch, gradkit.models
        >>> vae = gradkit.models.VAE(x_dim=64, hidden_dim=32, z_dim=3)
        >>> x = torch.bernoulli(torch.full((4, 64), 0.3))
        >>> from gradkit.models.vae import latent_gradient_estimates
        >>> g = latent_gradient_estimates(vae, x, estimator="pathwise", repeats=5)
        >>> g["loc"].shape, g["scale"].shape
        (torch.Size([5, 4, 3]), torch.Size([5, 4, 3]))
    """
    if estimator not in gk.ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {sorted(gk.ESTIMATORS)}")
    _checks.check_num_samples(repeats, why="repeats")
    with torch.no_grad():
        mu, std = model.encode(x)
    q = Independent(Normal(mu.expand(repeats, *mu.shape), std.expand(repeats, *std.shape)), 1)
    with torch.no_grad():
        estimates = gk.ESTIMATORS[estimator](
            lambda z: model.log_likelihood(x, z), q, num_samples, plate=True, **measuring(options)
        )
    return {name: g.mean(0) for name, g in estimates.items()}
