"""Models the chapters train with gradkit's estimators."""

from gradkit.models.bandit import ContextualBandit, PolicyNetwork, train_reinforce  # noqa: F401
from gradkit.models.logistic import BayesianLogisticRegression  # noqa: F401
from gradkit.models.sbn import SBNVAE, heldout_bound, train_sbn  # noqa: F401
from gradkit.models.topic import BernoulliTopicModel, GradientEstimator  # noqa: F401
from gradkit.models.vae import VAE, elbo, evaluate_elbo, train_vae, training_step  # noqa: F401
