"""gradkit: Monte Carlo gradient estimation for PyTorch.

Estimate :math:`\\nabla_\\theta \\mathbb{E}_{p(x;\\theta)}[f(x)]` with the score-function,
pathwise or measure-valued estimator, per sample (to measure variance) or wired into autograd
with :func:`expectation`. See the book for the derivations and experiments.
"""

from importlib.metadata import PackageNotFoundError, version

from gradkit import (
    baselines,
    control_variates,
    diagnostics,
    discrete,
    distributions,
    per_sample,
    quadrature,
    rao_blackwell,
    registry,
    reparam,
    sampling,
    scg,
    stochastic_ad,
    unordered_set,
)
from gradkit.autodiff import expectation
from gradkit.discrete import disarm_bound, vimco
from gradkit.distributions import DoubleSidedMaxwell
from gradkit.estimators import measure_valued, pathwise, score, score_function
from gradkit.per_sample import per_sample_grads
from gradkit.registry import ESTIMATORS, Estimator, PlateHint, Problem, register_estimator
from gradkit.weak_derivatives import (
    WeakDerivative,
    register_weak_derivative,
    registered_weak_derivatives,
)

try:
    __version__ = version("gradkit")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "ESTIMATORS",
    "DoubleSidedMaxwell",
    "Estimator",
    "PlateHint",
    "Problem",
    "WeakDerivative",
    "__version__",
    "baselines",
    "control_variates",
    "diagnostics",
    "disarm_bound",
    "discrete",
    "distributions",
    "expectation",
    "measure_valued",
    "pathwise",
    "per_sample",
    "per_sample_grads",
    "quadrature",
    "rao_blackwell",
    "register_estimator",
    "register_weak_derivative",
    "registered_weak_derivatives",
    "registry",
    "reparam",
    "sampling",
    "scg",
    "score",
    "score_function",
    "stochastic_ad",
    "unordered_set",
    "vimco",
]
