"""The benchmarks run, at tiny sizes, and their statistics flag what they should.

Peers (Pyro, Storchastic) are optional: their tests skip, with the reason, when a peer is not
installed. Numbers from these runs mean nothing; the benchmarks' own numbers come from
``make bench``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import __main__ as cli
from benchmarks import (
    bench_discrete,
    bench_peers,
    bench_per_sample,
    bench_programs,
    bench_scaling,
    peers,
    problems,
    report,
)
from benchmarks.common import (
    load_results,
    main_for,
    summarise,
    time_call,
    verdict,
    write_results,
)
from tests.stats import Z

# --- statistics -------------------------------------------------------------------------------


def test_summarise_matches_hand_computation():
    s = summarise(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor(2.0))
    assert s["mean"] == pytest.approx(2.5)
    assert s["variance"] == pytest.approx(5 / 3)
    assert s["max_abs_z"] == pytest.approx(0.5 / math.sqrt(5 / 3 / 4), rel=1e-4)


def test_wrong_mean_is_flagged_and_exact_estimator_is_not():
    torch.manual_seed(0)
    noise = torch.randn(1000)
    biased = summarise(0.025 + 0.01 * noise + 0.003, torch.tensor(0.025))
    unbiased = summarise(0.025 + 0.01 * noise, torch.tensor(0.025))
    exact = summarise(torch.full((1000,), 0.025) + 1e-9 * noise, torch.tensor(0.025))
    assert verdict(biased["max_abs_z"]).startswith("WRONG MEAN")
    assert verdict(unbiased["max_abs_z"]) == "ok"
    assert verdict(exact["max_abs_z"]) == "ok"
    assert verdict(math.nan, "RuntimeError: boom") == "fails: RuntimeError: boom"


def test_summarise_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2 estimates"):
        summarise(torch.ones(1), torch.tensor(1.0))
    with pytest.raises(ValueError, match="do not match the exact gradient"):
        summarise(torch.ones(5, 3), torch.ones(2))
    with pytest.raises(ValueError, match="repeats >= 1"):
        time_call(lambda: None, repeats=0)


# --- problems ---------------------------------------------------------------------------------


def test_exact_gradients():
    assert problems.get("bernoulli").exact()["logits"].item() == pytest.approx(0.025)
    exact = problems.get("gaussian").exact()
    assert (exact["loc"].item(), exact["scale"].item()) == (2.0, 3.0)
    with pytest.raises(KeyError, match="unknown problem 'nope'"):
        problems.get("nope")


def test_factorised_exact_gradient_matches_a_large_leave_one_out_estimate():
    # The enumeration over blocks against an unbiased estimator: 200 copies x 50 samples.
    spec = problems.get("factorised")
    dist = spec.distribution(spec.parameters(200))
    import gradkit as gk

    # the 200 copies are independent, one cost each: a declared plate
    g = gk.score_function(spec.cost, dist, 50, baseline=gk.baselines.LeaveOneOut(), plate=True)
    stats = summarise(g["logits"].mean(0), spec.exact()["logits"])
    assert stats["max_abs_z"] < Z  # max over 64 coordinates


# --- the peer comparison, gradkit only ------------------------------------------------------


def test_compare_gradkit_rows_are_correct():
    table, _ = bench_peers.compare("bernoulli", copies=100, samples=20, repeats=1, peers=())
    assert list(table.columns) == bench_peers.COLUMNS
    assert set(table.library) == {"gradkit"}
    assert (table.verdict == "ok").all(), table[["estimator", "mode", "verdict"]]
    assert set(table.estimator) >= {"score_function", "score_function+leave_one_out"}
    # the moving average is sequential: per call only
    ma = table[table.estimator == "score_function+moving_average"]
    assert list(ma["mode"]) == ["per_call"]


def test_compare_rejects_too_few_estimates():
    with pytest.raises(ValueError, match="copies >= 2"):
        bench_peers.compare("gaussian", copies=1, samples=10, peers=())


def test_plot_and_headline():
    table, _ = bench_peers.compare("gaussian", copies=10, samples=10, repeats=1, peers=())
    fig = bench_peers.plot(table, "gaussian")
    assert len(fig.axes) == 2
    assert report.headline(table).empty  # no peers, nothing to compare


# --- peers (optional) -------------------------------------------------------------------------


@pytest.mark.parametrize("peer", sorted(peers.PEERS))
def test_peer_matches_gradkit(peer):
    reason = peers.missing(peer)
    if reason:
        pytest.skip(reason)
    table, skipped = bench_peers.compare("gaussian", copies=50, samples=10, repeats=1, peers=[peer])
    assert peer not in skipped
    theirs = table[table.library == peer]
    assert set(theirs.estimator) == {"pathwise", "score_function"}
    assert (theirs.verdict == "ok").all(), theirs[["estimator", "mode", "verdict"]]
    # the same estimator with the same seed: the same variance up to sampling noise
    batched = theirs[theirs["mode"] == "batched"]
    assert batched.variance_vs_gradkit.between(0.5, 2.0).all()
    head = report.headline(table)
    assert set(head.peer) == {peer} and (head.slower_best > 0).all()


def test_missing_peer_reason():
    assert "unknown peer" in peers.missing("nope")
    with pytest.raises(RuntimeError, match="unknown peer"):
        peers.PeerWorker("nope")
    with pytest.raises(ValueError, match="unknown peer"):
        peers.estimate("nope", "gaussian", "pathwise", "batched", 2, 2)


# --- per-sample gradients and scaling ----------------------------------------------------------


def test_per_sample_agrees_with_loop():
    table = bench_per_sample.compare((3, 17), repeats=1)
    assert table.agree.all()
    assert (table.max_abs_diff < 1e-5).all()


def test_scaling_sweep_and_slopes():
    table = bench_scaling.sweep(bench_scaling.QUICK_SWEEPS, repeats=1)
    estimators = set(bench_scaling.estimator_calls())
    assert set(table.estimator) == estimators
    assert len(table) == 6 * len(estimators)
    assert (table.seconds > 0).all()
    assert report.slopes(table).shape == (len(estimators), 3)
    assert len(bench_scaling.plot(table).axes) == 3


# --- running benchmarks, results on disk, the chapter's loader --------------------------------


@pytest.mark.parametrize("name", cli.discover())
def test_each_benchmark_runs_quick(name, tmp_path):
    cli.run_one(name, tmp_path, quick=True, peers=False)
    written = {p.suffix for p in tmp_path.iterdir()}
    assert {".csv", ".json", ".png"} <= written


def test_command_line(tmp_path, capsys):
    assert cli.main(["--out", str(tmp_path), "--quick", "--only", "bench_per_sample"]) == 0
    table, meta = load_results("per_sample", tmp_path)
    assert list(table.samples) == [10, 100]
    assert meta["quick"] is True
    assert meta["machine"]["cpu_count"] >= 1 and "torch" in meta["machine"]["versions"]
    assert (tmp_path / "per_sample.png").exists()
    assert "per_sample" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["--only", "bench_nothing"])


def test_obtain_reads_results_or_runs(tmp_path):
    import pandas as pd

    write_results(tmp_path, "per_sample", pd.DataFrame({"samples": [1]}), meta={"quick": True})
    got = report.obtain("per_sample", "smoke", directory=tmp_path)
    assert got.origin.startswith("read from") and "--quick" in got.origin
    ran = report.obtain("per_sample", "smoke", directory=tmp_path / "empty")
    assert ran.origin.startswith("run now") and ran.table.agree.all()
    assert report.machines([got, ran]).shape[0] == 2
    assert report.other_results(tmp_path)["csv"] == []
    (tmp_path / "mvd_vae.json").write_text(json.dumps({"quick": True}))
    assert [p.name for p in report.other_results(tmp_path)["json"]] == ["mvd_vae.json"]
    with pytest.raises(ValueError, match="name must be one of"):
        report.obtain("nothing", "smoke")


# --- what the chapter says: verdicts, provenance, findings ----------------------------------


def test_verdict_shows_the_mean_and_a_zero_mean():
    assert verdict(57.7, mean=0.0548, exact=0.025) == (
        "WRONG MEAN (mean 0.0548, exact 0.025, |z| = 57.7)"
    )
    # an estimator that always returns 0 has zero variance: its |z| is the floor's 1e5
    zero = summarise(torch.full((100,), -1e-11), torch.tensor(0.025))
    assert zero["max_abs_z"] > 1e4
    assert verdict(zero["max_abs_z"], mean=zero["mean"], exact=zero["exact"]) == (
        "WRONG MEAN (returns 0, exact 0.025)"
    )
    assert verdict(1.0, mean=0.0, exact=0.025) == "ok"


def test_obtain_rewords_old_verdicts_with_the_mean(tmp_path):
    import pandas as pd

    old = pd.DataFrame(
        {
            "library": ["storchastic", "storchastic"],
            "estimator": ["ScoreFunctionWOR", "REBAR"],
            "mode": ["batched"] * 2,
            "parameter": ["logits"] * 2,
            "mean": [-1.8e-11, 0.0548],
            "exact": [0.025, 0.025],
            "max_abs_z": [99999.99, 57.67],
            "verdict": ["WRONG MEAN (|z| = 100000.0)", "WRONG MEAN (|z| = 57.7)"],
        }
    )
    write_results(tmp_path, "peers_bernoulli", old)
    got = report.obtain("peers_bernoulli", "smoke", directory=tmp_path).table
    assert list(got.verdict) == [
        "WRONG MEAN (returns 0, exact 0.025)",
        "WRONG MEAN (mean 0.0548, exact 0.025, |z| = 57.7)",
    ]


def _result(name, commit, origin="read from somewhere"):
    meta = {"machine": {"git_commit": commit, "created": "2026-01-02T03:04:05+00:00"}}
    return report.Result(name, None, meta, origin)


def test_provenance_names_commit_date_and_staleness():
    stale = report.provenance([_result("scaling", "aaa1111")], commit="bbb2222")
    assert "commit aaa1111 on 2026-01-02 03:04 UTC" in stale
    assert "checkout is at commit bbb2222" in stale and "make bench" in stale
    same = report.provenance([_result("scaling", "bbb2222")], commit="bbb2222")
    assert "That is this checkout's commit" in same and "refresh" not in same
    now = report.provenance([_result("per_sample", "bbb2222", "run now")], commit="bbb2222")
    assert now.startswith("per_sample: run just now") and "commit bbb2222" in now


def _peer_table(peer_ma_variance=1.5, wor_mean=0.0):
    import pandas as pd

    rows = [
        # library, estimator, mode, seconds, variance, verdict
        ("gradkit", "score_function", "batched", 0.01, 2.0, "ok"),
        ("gradkit", "score_function", "per_call", 1.0, 2.0, "ok"),
        ("gradkit", "score_function+moving_average", "per_call", 1.0, 1.0, "ok"),
        ("pyro", "score_function", "batched", 0.02, 2.0, "ok"),
        ("pyro", "score_function", "per_call", 5.0, 2.0, "ok"),
        ("pyro", "score_function+moving_average", "per_call", 4.0, peer_ma_variance, "ok"),
        ("storchastic", "ScoreFunctionWOR", "batched", 0.01, 0.0, verdict(1e5, mean=wor_mean,
                                                                          exact=0.025)),
        ("storchastic", "ScoreFunctionWOR", "per_call", 1.0, 0.0, verdict(1e5, mean=wor_mean,
                                                                           exact=0.025)),
    ]  # fmt: skip
    table = pd.DataFrame(
        rows, columns=["library", "estimator", "mode", "seconds", "variance", "verdict"]
    )
    table["parameter"] = "logits"
    gradkit = table[table.library == "gradkit"].set_index(["estimator", "mode"]).variance
    table["variance_vs_gradkit"] = [
        r.variance / gradkit.get((r.estimator, r.mode), float("nan")) for r in table.itertuples()
    ]
    return table


def test_findings_are_computed_from_the_rows():
    f = report.findings({"bernoulli": _peer_table()})
    assert f["gradkit_ok"] == f["gradkit_rows"] == 3
    assert f["peers"] == ["pyro", "storchastic"]
    assert f["wrong"] == ["storchastic ScoreFunctionWOR (returns 0)"]
    assert f["same_variance_deviation"] == 0.0 and "up to rounding" in f["same_variance"]
    assert f["moving_average_ratios"] == [1.5] and "least noisy" in f["moving_average"]
    assert f["batched_slower"] == [2.0] and f["per_call_slower"] == [500.0]
    assert "met in 0 of 1" in f["speed"] and "500 times" in f["speed"]
    assert f["summary"].startswith("All 3 of gradkit's rows agree")
    # the sentences follow the numbers
    noisier = report.findings({"bernoulli": _peer_table(peer_ma_variance=0.5)})
    assert "gradkit's is the noisiest" in noisier["moving_average"]
    nonzero = report.findings({"bernoulli": _peer_table(wor_mean=0.01)})
    assert nonzero["wrong"] == ["storchastic ScoreFunctionWOR"]


def test_findings_without_peers_say_so():
    table = _peer_table()
    f = report.findings({"bernoulli": table[table.library == "gradkit"]}, no_peers="not here")
    assert f["peers"] == [] and f["wrong"] == []
    assert f["same_variance"] == f["moving_average"] == f["speed"] == ""
    assert "No peer ran for these results (not here)" in f["summary"]
    assert "least noisy" not in f["summary"] and "identical" not in f["summary"]


def test_measure_valued_cost_evaluations_are_one_plus_three_d():
    assert [bench_scaling.cost_evaluations(d) for d in (1, 7, 30)] == [4.0, 22.0, 91.0]
    assert bench_scaling.cost_evaluations(5, batch=6) == 16.0
    with pytest.raises(ValueError, match="sizes must be positive"):
        bench_scaling.cost_evaluations(0)


# --- discrete latents: gradkit and Storchastic on the REBAR toy --------------------------------

# the estimators whose gradkit rows must be correct here (the others are checked for their
# columns only: their correctness is tested with the estimators themselves)
_ESTABLISHED = (
    "score_function",
    "score_function+leave_one_out",
    "arm",
    "disarm",
    "indecater",
    "enumerate",
)


def _pairs(*names):
    return [p for p in bench_discrete.PAIRS if p.estimator in names and p.gradkit is not None]


class _RaisingWorker:
    """A Storchastic worker whose every call raises, as a crashed peer process would."""

    def call(self, fn, *args, **kwargs):
        raise RuntimeError("boom: the peer fell over")


class _FakeWorker:
    """A Storchastic worker that returns ``value`` for every estimate, or an error."""

    def __init__(self, value=0.3, error=None):
        self.value, self.error, self.calls = value, error, []

    def call(self, fn, call, n, t, theta, mode, count, repeats, seed):
        assert fn is bench_discrete.storch_job
        self.calls.append((call, n, mode, count))
        if self.error:
            return {"estimates": None, "seconds": math.nan, "error": self.error}
        return {"estimates": torch.full((count,), self.value), "seconds": 0.01, "error": None}


def test_discrete_exact_gradient_is_one_minus_two_t():
    for t in bench_discrete.T_VALUES:
        assert bench_discrete.exact_gradient(t) == pytest.approx(1 - 2 * t, abs=1e-15)
    # and it is the derivative of E[(b - t)^2] = theta (1 - t)^2 + (1 - theta) t^2 in theta
    theta = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    t = 0.45
    (grad,) = torch.autograd.grad(theta * (1 - t) ** 2 + (1 - theta) * t**2, theta)
    assert grad.item() == pytest.approx(bench_discrete.exact_gradient(t))
    # exact enumeration in gradkit gives it too, at every t
    table = bench_discrete.toy_rows(copies=10, estimators=_pairs("enumerate"), peers=())
    assert list(table.exact) == pytest.approx([1 - 2 * t for t in bench_discrete.T_VALUES])
    assert list(table["mean"]) == pytest.approx(list(table.exact), abs=1e-6)


def test_discrete_toy_rows_gradkit_part():
    table = bench_discrete.toy_rows([0.45, 0.501], copies=200, samples=4, peers=())
    assert list(table.columns) == bench_discrete.TOY_COLUMNS
    assert set(table.library) == {"gradkit"}
    assert table.attrs["skipped"] == {"storchastic": "Storchastic was not asked for"}
    assert set(table.t) == {0.45, 0.501} and (table.theta == bench_discrete.THETA).all()
    established = table[table.estimator.isin(_ESTABLISHED)]
    assert len(established) == 2 * len(_ESTABLISHED)
    assert (established.verdict == "ok").all(), established[["estimator", "t", "verdict"]]
    assert (established.ms_per_estimate > 0).all() and (established.estimates == 200).all()
    # ARM and DisARM count draws, two per antithetic pair
    assert set(table[table.estimator == "arm"].samples) == {8}
    # relaxations are biased by design, and say so instead of "WRONG MEAN"
    relaxed = table[table.estimator.isin(["straight_through", "gumbel_softmax"])]
    assert relaxed.verdict.str.startswith("biased by design").all()
    assert not table.verdict.str.startswith("WRONG MEAN").any()
    # a signed z: the standard error is the variance over the number of estimates
    row = established.iloc[0]
    assert row.std_error == pytest.approx(math.sqrt(row.variance / 200))
    assert row.z == pytest.approx((row["mean"] - row.exact) / row.std_error, rel=1e-3)


def test_discrete_gradkit_name_not_registered_is_a_row_with_a_note():
    pairs = [bench_discrete.Pair("nothing_yet", "no_such_estimator_yet", None)]
    table = bench_discrete.toy_rows([0.45], copies=10, estimators=pairs, peers=())
    (row,) = table.itertuples()
    assert row.verdict == "not available" and math.isnan(row.mean)
    assert "not in gk.ESTIMATORS" in row.note
    timing = bench_discrete.toy_per_call(calls=2, batch=4, repeats=1, estimators=pairs, peers=())
    assert timing.gradkit_ms.isna().all() and timing.note.str.contains("gk.ESTIMATORS").all()


def test_discrete_raising_peer_is_a_row_with_a_note():
    pairs = _pairs("score_function", "arm")
    table = bench_discrete.toy_rows(
        [0.45], copies=20, estimators=pairs, worker=_RaisingWorker(), peers=()
    )
    theirs = table[table.library == "storchastic"]
    assert len(theirs) == 2
    assert (theirs.verdict == "fails: RuntimeError: boom: the peer fell over").all()
    assert (theirs.note == "RuntimeError: boom: the peer fell over").all()
    assert theirs["mean"].isna().all()
    assert (table[table.library == "gradkit"].verdict == "ok").all()
    # an error Storchastic itself raised comes back from the worker the same way
    failing = _FakeWorker(error="RuntimeError: Subtraction, the `-` operator, with a bool tensor")
    table = bench_discrete.toy_rows([0.45], copies=20, estimators=pairs, worker=failing)
    assert table[table.library == "storchastic"].note.str.contains("bool tensor").all()
    timing = bench_discrete.toy_per_call(
        calls=2, batch=4, repeats=1, estimators=pairs, worker=_RaisingWorker()
    )
    assert timing.storchastic_ms.isna().all()
    assert timing.note.str.contains("Storchastic fails: RuntimeError: boom").all()
    assert (timing.gradkit_ms > 0).all()


def test_discrete_peer_rows_are_judged_like_gradkit_rows():
    # a "peer" that always returns 0.3 at t = 0.45 (exact 0.1): a wrong mean of zero variance
    worker = _FakeWorker(value=0.3)
    pairs = _pairs("score_function+leave_one_out", "straight_through_gumbel")
    table = bench_discrete.toy_rows([0.45], copies=30, estimators=pairs, worker=worker)
    theirs = table[table.library == "storchastic"].set_index("estimator")
    assert theirs.loc["score_function+leave_one_out", "verdict"].startswith(
        "WRONG MEAN (mean 0.3, exact 0.1"
    )
    assert theirs.loc["straight_through_gumbel", "verdict"].startswith("biased by design")
    assert theirs.loc["score_function+leave_one_out", "method"] == (
        "storch.method.ScoreFunction('z', n_samples=4, baseline_factory='batch_average')"
    )
    assert worker.calls[0] == (pairs[0].storchastic, 4, "batched", 30)
    timing = bench_discrete.toy_per_call(
        calls=3, batch=5, repeats=1, estimators=pairs[:1], worker=worker
    )
    assert list(timing["mode"]) == ["per_call", "batched"]
    per = timing.set_index("mode")
    # the fake takes 0.01 s for all 3 per-call estimates, and 0.01 s for one batched call
    assert per.loc["per_call", "storchastic_ms"] == pytest.approx(10 / 3)
    assert per.loc["batched", "storchastic_ms"] == pytest.approx(10)
    ratio = per.storchastic_ms / per.gradkit_ms
    assert list(per.storchastic_vs_gradkit) == pytest.approx(list(ratio))
    assert list(per.target_10x_met) == [bool(r >= 10) for r in ratio]
    found = report.discrete_findings(table, timing)
    assert found["peer_ran"] and len(found["peer_wrong"]) == 1
    assert "ScoreFunction" in found["peer_wrong"][0] and "tenfold target" in found["speed"]


def test_discrete_runs_without_storchastic(monkeypatch, tmp_path):
    reason = "storchastic is not installed (pip install storchastic)"
    monkeypatch.setattr(peers, "missing", lambda peer: reason)
    pairs = _pairs("score_function", "disarm")
    table = bench_discrete.toy_rows([0.45], copies=20, estimators=pairs)  # peers=None: any
    assert set(table.library) == {"gradkit"}
    assert table.attrs["skipped"] == {"storchastic": reason}
    timing = bench_discrete.toy_per_call(calls=2, batch=4, repeats=1, estimators=pairs)
    assert timing.storchastic_ms.isna().all() and timing.target_10x_met.isna().all()
    found = report.discrete_findings(table, timing, no_peer="not installed here")
    assert not found["peer_ran"] and found["speed"] == ""
    assert "Storchastic did not run for these results (not installed here)" in found["summary"]
    assert found["summary"].startswith("All 2 of gradkit's rows")
    # the chapter's loader, at smoke scale, and the shared command line
    got = report.obtain("discrete_toy", "smoke", directory=tmp_path)
    assert got.origin.startswith("run now") and set(got.table.library) == {"gradkit"}
    monkeypatch.setattr(bench_discrete, "QUICK", {
        "toy": {"ts": [0.45], "copies": 5, "samples": 4},
        "per_call": {"calls": 2, "batch": 4, "repeats": 1, "samples": 4},
    })  # fmt: skip
    assert main_for(bench_discrete.run, "toy", ["--out", str(tmp_path), "--quick"]) == 0
    for name in ("discrete_toy", "discrete_per_call"):
        written, meta = load_results(name, tmp_path)
        assert meta["quick"] and meta["skipped"] == {"storchastic": reason}
        assert (tmp_path / f"{name}.png").exists()
        assert report.obtain(name, "smoke", directory=tmp_path).skipped == meta["skipped"]
    assert set(written.columns) == set(bench_discrete.PER_CALL_COLUMNS)


def test_discrete_with_storchastic():
    reason = peers.missing("storchastic")
    if reason:
        pytest.skip(reason)
    pairs = _pairs("score_function+leave_one_out", "rebar")
    table = bench_discrete.toy_rows([0.45], copies=1000, estimators=pairs, peers=["storchastic"])
    theirs = table[table.library == "storchastic"].set_index("estimator")
    assert theirs.loc["score_function+leave_one_out", "verdict"] == "ok"
    # the same estimator: the same variance, up to sampling noise
    assert 0.7 < theirs.loc["score_function+leave_one_out", "variance_vs_gradkit"] < 1.4
    # Storchastic's REBAR has a wrong mean on this problem (about 0.27 against 0.1)
    assert theirs.loc["rebar", "verdict"].startswith("WRONG MEAN")
    assert theirs.loc["rebar", "mean"] > 0.2


@pytest.mark.parametrize("estimate", ["hand_stochastic_ad", "hand_score_function"])
def test_hand_written_walks_match_the_exact_derivative(estimate):
    from gradkit.models import programs

    rows = getattr(bench_programs, estimate)(40.0, 20, 40_000, torch.Generator().manual_seed(0))
    _, exact = programs.random_walk_exact(40.0, 20)
    se = rows.std().item() / math.sqrt(rows.shape[0])
    assert abs(rows.mean().item() - exact) < Z * se


def test_programs_walk_compares_every_way_with_ratios():
    table = bench_programs.compare((4,), runs=300, repeats=1)
    assert set(table.way) == {
        "stochastic_ad",
        "score_function",
        "hand_stochastic_ad",
        "hand_score_function",
    }
    assert (table.verdict == "ok").all()
    ways = table.set_index("way")
    assert ways.loc["score_function", "vs_score_function"] == 1.0
    assert ways.loc["stochastic_ad", "vs_hand"] == pytest.approx(
        ways.loc["stochastic_ad", "seconds"] / ways.loc["hand_stochastic_ad", "seconds"]
    )
