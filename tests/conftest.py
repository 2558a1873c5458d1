"""Shared fixtures. Statistical tests fix their seed: see tests/README.md."""

import pytest
import torch
from hypothesis import settings

# Hypothesis draws its examples from a fixed seed too: the same examples every run.
settings.register_profile("gradkit", derandomize=True)
settings.load_profile("gradkit")


@pytest.fixture(autouse=True)
def _seed():
    # Randomized statistical tests: each test starts from the same seed, so a tolerance of a
    # few standard errors gives a deterministic pass/fail that still fails for a wrong estimator.
    torch.manual_seed(0)
    yield
