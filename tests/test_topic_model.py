"""The binary latent factor topic model, its gradient estimators, training loop and data loader.

Statistical tests use a small model (k = 3 factors, 2**3 = 8 states) on documents sampled from
another instance of the model, so every expectation over z is a finite sum: Monte Carlo means
are compared with the enumerated value within a few standard errors (seed fixed by conftest).
"""

from __future__ import annotations

import itertools
import statistics
import warnings

import matplotlib
import pytest
import torch
from torch.distributions import Bernoulli, Multinomial

import gradkit as gk
from compendium import topic_studies
from gradkit.data import reuters
from gradkit.models import topic
from tests.stats import Z, assert_unbiased

matplotlib.use("Agg")

V, K = 12, 3
UNBIASED = [m for m, (_, biased) in topic.METHODS.items() if not biased]


@pytest.fixture
def docs():
    truth = topic.BernoulliTopicModel(V, K, prior=0.3, decoder_hidden=8)
    with torch.no_grad():
        for p in truth.decoder.parameters():
            p.mul_(3.0)
    counts, _ = truth.sample(num_docs=5, doc_length=20)
    return counts


@pytest.fixture
def model():
    torch.manual_seed(1)
    return topic.BernoulliTopicModel(V, K, prior=0.3, encoder_hidden=16, decoder_hidden=8)


def enumerate_elbo(model, docs):
    """ELBO and log marginal by an explicit loop over the 2**k states (independent of the model's
    vectorised enumeration), with log p(x|z) from torch's Multinomial minus its coefficient."""
    logits = model.logits(docs)
    log_coef = torch.lgamma(docs.sum(-1) + 1) - torch.lgamma(docs + 1).sum(-1)
    expected, joint = torch.zeros(len(docs)), []
    for bits in itertools.product([0.0, 1.0], repeat=K):
        z = torch.tensor(bits)
        word_logits = model.decoder(z)
        log_lik = Multinomial(logits=word_logits, validate_args=False).log_prob(docs) - log_coef
        log_q = Bernoulli(logits=logits).log_prob(z).sum(-1)
        expected = expected + log_q.exp() * log_lik
        joint.append(model.prior().log_prob(z) + log_lik)
    log_q_kl = model.kl(logits)
    return expected - log_q_kl, torch.logsumexp(torch.stack(joint), 0)


def test_elbo_matches_enumeration(model, docs):
    with torch.no_grad():
        elbo, log_marginal = enumerate_elbo(model, docs)
        torch.testing.assert_close(model.exact_elbo(docs), elbo)
        torch.testing.assert_close(model.exact_log_marginal(docs), log_marginal)
        assert torch.all(elbo <= log_marginal + 1e-5)  # the gap is KL(q || posterior) >= 0
        logits = model.logits(docs)
        z = model.posterior(docs).sample((4000,))
        assert_unbiased(model.log_likelihood(docs, z) - model.kl(logits), elbo)
        assert model.elbo(docs, num_samples=8).shape == (5,)


def test_the_two_forms_of_the_elbo_and_the_sampled_one_are_unbiased(model, docs):
    # log p(x|z) - KL, log p(x, z) + H(q) and log p(x, z) - log q(z): the same mean
    torch.manual_seed(3)
    rows = model.elbo_samples(docs, 20_000)
    assert set(rows) == {"likelihood − KL", "joint + entropy", "joint − log q"}
    exact, _ = enumerate_elbo(model, docs)
    for form, values in rows.items():
        assert values.shape == (20_000, len(docs)), form
        assert_unbiased(values, exact.detach(), atol=1e-4)
    # and row by row, from the same draws, with entropy and KL summed over the 2**k states
    torch.manual_seed(4)
    rows = model.elbo_samples(docs, 50)
    torch.manual_seed(4)
    with torch.no_grad():
        q = model.posterior(docs)
        z = q.sample((50,))
        states = torch.tensor(list(itertools.product([0.0, 1.0], repeat=K)))
        log_q_states = q.log_prob(states[:, None, :])  # (2**k, B)
        entropy = -(log_q_states.exp() * log_q_states).sum(0)
        kl = (log_q_states.exp() * (log_q_states - model.prior().log_prob(states)[:, None])).sum(0)
        log_lik = model.log_likelihood(docs, z)
        log_joint = log_lik + model.prior().log_prob(z)
    torch.testing.assert_close(rows["likelihood − KL"], log_lik - kl)
    torch.testing.assert_close(rows["joint + entropy"], log_joint + entropy)
    torch.testing.assert_close(rows["joint − log q"], log_joint - q.log_prob(z))


def test_kl_matches_enumeration(model, docs):
    logits = model.logits(docs)
    states = torch.tensor(list(itertools.product([0.0, 1.0], repeat=K)))
    log_q = Bernoulli(logits=logits[:, None]).log_prob(states).sum(-1)
    log_p = model.prior().log_prob(states)
    exact = (log_q.exp() * (log_q - log_p)).sum(-1)
    torch.testing.assert_close(model.kl(logits), exact)


def make_estimator(method, docs, num_samples=4):
    return topic.GradientEstimator(method, num_samples, vocab_size=V).to(docs.dtype)


@pytest.mark.parametrize("method", UNBIASED)
def test_logit_gradient_is_unbiased(model, docs, method):
    estimator = make_estimator(method, docs)
    if method == "ema":  # give the average a history, so the baseline is not zero
        for _ in range(3):
            estimator(model, docs, model.logits(docs))
        assert estimator.baseline.steps == 3
    if method == "learned":  # a baseline far from the signal's mean still leaves no bias
        assert estimator.learned(docs).abs().min() > 10
    exact = topic.exact_logit_gradient(model, docs)
    g = topic.logit_gradients(model, estimator, docs, replicates=3000)
    assert_unbiased(g, exact, atol=1e-6)
    assert topic.summarise_logit_gradients(g, exact)["max_bias_z"] <= Z
    if method == "ema":
        assert estimator.baseline.steps == 3  # measuring left the average untouched


@pytest.mark.parametrize(
    "method", ["none", "ema", "learned", "loo", "linear_cv", "straight_through"]
)
def test_the_documents_are_declared_a_plate(model, docs, method, monkeypatch):
    monkeypatch.setattr(gk.registry, "_hinted", set())  # the hint is issued once per process
    estimator = make_estimator(method, docs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", gk.PlateHint)
        value, aux = estimator(model, docs, model.logits(docs))
        (value.sum() + aux).backward()
        topic.logit_gradients(model, estimator, docs, replicates=2)


def test_straight_through_is_biased(model, docs):
    exact = topic.exact_logit_gradient(model, docs)
    n = 3000
    g = topic.logit_gradients(model, make_estimator("straight_through", docs), docs, n)
    z = topic.summarise_logit_gradients(g, exact)["max_bias_z"]
    assert z > 10, f"expected a clear bias, got a largest z-score of {z:.1f}"


@pytest.mark.parametrize("method", ["none", "local_expectation", "straight_through"])
def test_decoder_gets_ordinary_unbiased_gradient(model, docs, method):
    weight = model.decoder[-1].weight
    estimator = make_estimator(method, docs)
    logits = model.logits(docs).detach()
    exact = torch.autograd.grad(model.expected_log_likelihood_exact(docs, logits).sum(), weight)[0]
    n = 300
    grads = torch.stack(
        [torch.autograd.grad(estimator(model, docs, logits)[0].sum(), weight)[0] for _ in range(n)]
    )
    assert_unbiased(grads, exact, atol=1e-5)


def test_baselines_reduce_variance(model, docs):
    variance = {
        m: topic.encoder_gradient_variance(model, make_estimator(m, docs), docs, replicates=200)
        for m in ["none", "loo", "linear_cv", "local_expectation"]
    }
    assert variance["loo"] < variance["none"] / 10
    assert variance["local_expectation"] < variance["loo"]
    # the control variate that depends on z removes what the baseline cannot
    assert variance["linear_cv"] < variance["loo"] / 10


def test_moving_average_is_kept_in_nats_whatever_the_loss_scale(model, docs):
    """Training scales the loss by 1/tokens; the average must still track log p(x|z) itself."""
    estimator = make_estimator("ema", docs)
    for _ in range(5):
        value, _ = estimator(model, docs, model.logits(docs))
        (-value.sum() / docs.sum()).backward()
    assert estimator.baseline.steps == 5
    none = topic.encoder_gradient_variance(
        model, make_estimator("none", docs), docs, replicates=200
    )
    ema = topic.encoder_gradient_variance(model, estimator, docs, replicates=200)
    assert ema < none / 10, (ema, none)


def test_gradient_variance_matches_per_replicate_backward(model, docs):
    """The vmap'd vector-Jacobian product equals a plain backward pass per replicate."""
    estimator = make_estimator("loo", docs)
    torch.manual_seed(3)
    fast = topic.encoder_gradient_variance(model, estimator, docs, replicates=6)
    torch.manual_seed(3)
    g = topic.logit_gradients(model, estimator, docs, 6) / docs.sum()
    logits = model.logits(docs)
    params = list(model.encoder.parameters())
    rows = [torch.autograd.grad(logits, params, g[r], retain_graph=True) for r in range(6)]
    slow = sum(torch.stack(p).var(0).sum() for p in zip(*rows, strict=True))
    assert fast == pytest.approx(float(slow), rel=1e-4)


def test_training_increases_elbo():
    truth = topic.BernoulliTopicModel(30, 3, prior=0.3, decoder_hidden=0)  # clear topics
    with torch.no_grad():
        truth.decoder[0].weight.mul_(4.0)
    corpus, _ = truth.sample(num_docs=240, doc_length=40)
    model = topic.BernoulliTopicModel(30, 3, prior=0.3, word_counts=corpus[:200].sum(0))
    run = topic.train(
        model, corpus[:200], corpus[200:], "loo", steps=150, batch_size=32,
        lr=1e-2, eval_every=50, progress=False,
    )  # fmt: skip
    assert run.steps == [0, 50, 100, 150]
    test, train = run.column("test_elbo"), run.column("train_elbo")
    assert test[-1] > test[0] + 0.1, test
    assert train[-1] > train[0] + 0.1, train
    assert all(v > 0 for v in run.column("grad_variance"))
    assert run[-1]["seconds"] > 0 and run.model is model and run.label == "loo"


def test_float64_and_device_are_kept(docs):
    model = topic.BernoulliTopicModel(V, K).double()
    docs = docs.double()
    assert model.elbo(docs).dtype == torch.float64
    assert model.exact_elbo(docs).dtype == torch.float64
    for method in topic.METHODS:
        value, aux = make_estimator(method, docs)(model, docs, model.logits(docs))
        assert value.dtype == aux.dtype == torch.float64 and value.shape == (5,), method
    g = topic.logit_gradients(model, make_estimator("local_expectation", docs), docs, 3)
    assert g.dtype == torch.float64 and g.shape == (3, 5, K)


def test_compare_estimators_and_plots(docs):
    runs = topic_studies.compare_estimators(
        docs, docs, ["learned", "straight_through"], [0, 1], steps=4, eval_every=2,
        replicates=3, progress=False, model_options={"num_factors": K},
        method_options={"learned": {"num_samples": 2}},
    )  # fmt: skip
    assert [len(r) for r in runs.values()] == [2, 2]
    assert runs["learned"][0].steps == [0, 2, 4]
    stats = topic_studies.run_summary(runs)
    finals = torch.tensor([r[-1]["test_elbo"] for r in runs["learned"]], dtype=torch.float64)
    assert stats["learned"]["test_elbo"] == pytest.approx(float(finals.mean()))
    assert stats["learned"]["test_elbo_sd"] == pytest.approx(float(finals.std()))
    wall = sum(r[-1]["seconds"] for r in runs["learned"])
    assert stats["learned"]["wall_time"] == pytest.approx(wall / 2)
    times = [t for r in runs["learned"] for t in r.step_seconds]
    assert stats["learned"]["ms_per_step"] == pytest.approx(1000 * statistics.median(times))
    with pytest.raises(ValueError, match="'loo' has no runs"):
        topic_studies.run_summary({"loo": []})
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    topic_studies.plot_curves(runs, "test_elbo", ax)
    topic_studies.plot_curves(runs, "grad_variance", ax, log=True)
    assert ax.get_yscale() == "log" and len(ax.lines) == 4
    fig = topic_studies.plot_factor_words(
        runs["learned"][0].model, [f"w{i}" for i in range(V)], top=4
    )
    assert len(fig.axes) == 4  # 3 factors in a row of 4 panels
    plt.close("all")
    words = topic.factor_words(runs["learned"][0].model, [f"w{i}" for i in range(V)], top=2)
    assert len(words) == K and all(len(w) == 2 for w in words)


def test_factor_effects_of_linear_decoder_are_its_weights():
    model = topic.BernoulliTopicModel(V, K, decoder_hidden=0)
    w = model.decoder[0].weight.detach().T  # (k, V)
    effects = model.factor_effects()
    torch.testing.assert_close(effects - effects.mean(-1, keepdim=True), w - w.mean(-1, True))


@pytest.mark.parametrize("hidden", [0, 8])
def test_word_counts_set_the_background(hidden):
    counts = torch.arange(1.0, V + 1)
    model = topic.BernoulliTopicModel(V, K, decoder_hidden=hidden, word_counts=counts)
    with torch.no_grad():  # every factor off: the unigram model of the corpus
        probs = torch.softmax(model.decoder(torch.zeros(K)), -1)
    torch.testing.assert_close(probs, (counts + 0.5) / (counts.sum() + 0.5 * V))


def test_default_decoder_is_a_network_with_softmax_output():
    model = topic.BernoulliTopicModel(V, K)
    assert [type(m) for m in model.decoder] == [torch.nn.Linear, torch.nn.Tanh, torch.nn.Linear]
    assert model.decoder[0].out_features == 64
    z = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    with torch.no_grad():
        out = model.decoder(z)
    # factor 1's effect on the word log-odds depends on factor 2, unlike a linear decoder's
    assert not torch.allclose(out[1] - out[0], out[3] - out[2], atol=1e-3)
    linear = topic.BernoulliTopicModel(V, K, decoder_hidden=0).decoder(z).detach()
    torch.testing.assert_close(linear[1] - linear[0], linear[3] - linear[2])


# --- errors -------------------------------------------------------------------------------


def test_model_errors(model, docs):
    with pytest.raises(ValueError, match="vocab_size must be a positive int"):
        topic.BernoulliTopicModel(0, 3)
    with pytest.raises(ValueError, match=r"prior must be a probability in \(0, 1\)"):
        topic.BernoulliTopicModel(V, K, prior=1.0)
    with pytest.raises(ValueError, match="encoder_hidden must be >= 1"):
        topic.BernoulliTopicModel(V, K, encoder_hidden=0)
    with pytest.raises(ValueError, match=r"word_counts must have shape \(12,\)"):
        topic.BernoulliTopicModel(V, K, word_counts=torch.ones(3))
    with pytest.raises(ValueError, match=r"docs must have shape \(num_docs, 12\)"):
        model.logits(torch.ones(5, 7))
    with pytest.raises(ValueError, match="non-negative word counts"):
        model.logits(-docs)
    with pytest.raises(TypeError, match=r"floating tensor of word counts.*docs.float\(\)"):
        model.logits(docs.long())
    with pytest.raises(ValueError, match="k=17 is above the limit of 16"):
        topic.BernoulliTopicModel(V, 17).exact_elbo(docs)
    with pytest.raises(ValueError, match="vocabulary has 2 words but the model has vocab_size=12"):
        topic.factor_words(model, ["a", "b"])


def test_estimator_errors(model, docs):
    with pytest.raises(ValueError, match="unknown method 'reinforce'; choose one of"):
        topic.GradientEstimator("reinforce", 4)
    with pytest.raises(ValueError, match="leave-one-out baseline needs num_samples >= 2"):
        topic.GradientEstimator("loo", 1)
    with pytest.raises(ValueError, match="leave-one-out baseline needs num_samples >= 2"):
        topic.GradientEstimator("linear_cv", 1)
    with pytest.raises(ValueError, match="needs vocab_size="):
        topic.GradientEstimator("learned", 4)
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        topic.GradientEstimator("none", 0)
    with pytest.raises(ValueError, match="temperature must be positive"):
        topic.GradientEstimator("straight_through", 2, temperature=0.0)
    with pytest.raises(ValueError, match="replicates >= 2"):
        topic.encoder_gradient_variance(
            model, topic.GradientEstimator("none", 2), docs, replicates=1
        )


def test_training_errors(model, docs):
    with pytest.raises(ValueError, match="steps must be a positive int"):
        topic.train(model, docs, docs, "loo", steps=0)
    with pytest.raises(ValueError, match="eval_every must be a positive int"):
        topic.train(model, docs, docs, "loo", eval_every=0)
    with pytest.raises(ValueError, match="replicates >= 2"):
        topic.train(model, docs, docs, "loo", replicates=1, progress=False)
    with pytest.raises(ValueError, match="unknown method 'sgd'"):
        topic.train(model, docs, docs, "sgd", steps=1, progress=False)
    with pytest.raises(ValueError, match=r"docs must have shape \(num_docs, 12\)"):
        topic.train(model, docs[:, :5], docs, "loo")
    with pytest.raises(ValueError, match=r"unknown methods \['sgd'\]"):
        topic_studies.compare_estimators(docs, docs, ["sgd"], [0], model_options={"num_factors": K})
    import matplotlib.pyplot as plt

    fig_ax = plt.subplots()[1]
    with pytest.raises(ValueError, match="key must be 'train_elbo'"):
        topic_studies.plot_curves({}, "loss", fig_ax)


# --- data -----------------------------------------------------------------------------------


def test_reuters_loads_from_the_installed_package():
    corpus = reuters.load_reuters(vocab_size=None)
    assert corpus.train.shape == (316, 4258) and corpus.test.shape == (79, 4258)
    assert corpus.vocab_size == 4258 and corpus.vocabulary[:2] == ["church", "pope"]
    assert float(corpus.train.sum() + corpus.test.sum()) == 84010.0  # tokens in the file
    assert len(corpus.train_titles) == 316 and len(corpus.test_titles) == 79
    small = reuters.load_reuters(vocab_size=300, dtype=torch.float64)
    assert small.train.shape[1] == 300 and small.train.dtype == torch.float64
    frequent = corpus.train.sum(0) + corpus.test.sum(0)
    kept = {corpus.vocabulary.index(w) for w in small.vocabulary}
    assert min(frequent[list(kept)]) >= frequent.sort(descending=True).values[299]


def test_reuters_split_is_seeded_and_disjoint():
    a = reuters.load_reuters(vocab_size=200, seed=0)
    b = reuters.load_reuters(vocab_size=200, seed=0)
    c = reuters.load_reuters(vocab_size=200, seed=1, test_fraction=0.5)
    assert a.test_titles == b.test_titles and a.test_titles != c.test_titles
    assert not set(a.test_titles) & set(a.train_titles)
    assert len(c.test_titles) == round(0.5 * 395)


def test_reuters_errors(monkeypatch):
    with pytest.raises(ValueError, match="vocab_size must be a positive int or None"):
        reuters.load_reuters(vocab_size=0)
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\)"):
        reuters.load_reuters(test_fraction=1.0)
    with pytest.raises(TypeError, match="floating dtype"):
        reuters.load_reuters(dtype=torch.int64)
    with pytest.raises(ValueError, match="declares 3 distinct words but lists 1"):
        reuters.parse_ldac("3 0:1\n", vocab_size=2)
    with pytest.raises(ValueError, match=r"word id outside \[0, 2\)"):
        reuters.parse_ldac("1 5:1\n", vocab_size=2)

    def missing(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(reuters.resources, "files", missing)
    with pytest.raises(ModuleNotFoundError, match="pip install lda"):
        reuters.load_reuters()
