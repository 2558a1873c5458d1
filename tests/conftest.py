"""Shared fixtures. Statistical tests fix their seed: see tests/README.md."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    # Randomized statistical tests: each test starts from the same seed, so a tolerance of a
    # few standard errors gives a deterministic pass/fail that still fails for a wrong estimator.
    torch.manual_seed(0)
    yield
