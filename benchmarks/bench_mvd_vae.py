"""Speed of the measure-valued VAE gradient: gradkit's batched engine against a per-dimension loop.

One *encoder-gradient step* encodes a batch, estimates the gradient of
E_q[log p(x|z)] with respect to the encoder outputs (mu, std) with the measure-valued estimator
and back-propagates it (and the decoder's ordinary gradient) into the weights. Compared:

* ``loop (source)`` — the reference, written like the source blog post's ``get_mu_std_grad``:
  two base draws z1, z2 from q, then a Python loop over the latent dimensions that replaces
  coordinate i with a Weibull(sqrt 2, 2) draw (mean) or a double-sided Maxwell draw and its
  Maxwell-Gaussian partner u * m (standard deviation): 4 * z_dim decoder calls.
* ``gradkit, uncoupled`` — ``gk.expectation(..., estimator="measure_valued", coupling=False)``:
  the same 4 * z_dim evaluations per data point, stacked into one batched call.
* ``gradkit, coupled`` — the default: shared Rayleigh draws for the mean and the
  Maxwell-Gaussian pair drawn given the sample itself, 3 * z_dim evaluations.

Also: images per second of a full training step (Adam on the negative ELBO) for each estimator.
Methods are timed round-robin; ``ms_per_step`` is the minimum over the repeats (the least
disturbed by other work on the machine), ``ms_median`` the median.
Run ``python -m benchmarks.bench_mvd_vae [--out DIR] [--quick]``; it prints the tables and writes
CSV files, a PNG figure and a JSON record of the machine to ``DIR`` (default
``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from torch.distributions import Bernoulli, Gamma, Normal, Weibull

import gradkit as gk
import gradkit.models
from benchmarks.common import write_results
from gradkit.models import VAE

OUT = Path(__file__).resolve().parent / "results"


def source_loop_step(model: VAE, x: Tensor) -> None:
    """One encoder-gradient step with the source's per-latent-dimension loop (the reference)."""
    mu, std = model.encode(x)
    q = Normal(mu, std)
    f = lambda z: model.log_likelihood(x, z)  # noqa: E731
    value = f(q.sample())  # the decoder's gradient, at a detached sample
    with torch.no_grad():
        z1, z2 = q.sample(), q.sample()
        ones = torch.ones_like(mu[:, 0])
        weibull = Weibull(math.sqrt(2.0) * ones, 2.0 * ones)
        sign, chi2 = Bernoulli(0.5 * ones), Gamma(1.5 * ones, 0.5 * ones)
        grad_mu, grad_std = torch.empty_like(mu), torch.empty_like(std)
        for i in range(mu.shape[-1]):
            m_i, s_i = mu[:, i], std[:, i]
            plus, minus = z1.clone(), z2.clone()
            w = weibull.sample()
            plus[:, i], minus[:, i] = m_i + s_i * w, m_i - s_i * w
            grad_mu[:, i] = (f(plus) - f(minus)) / (s_i * math.sqrt(2 * math.pi))
            maxwell = (2.0 * sign.sample() - 1.0) * chi2.sample().sqrt()
            plus[:, i] = m_i + s_i * maxwell
            minus[:, i] = m_i + s_i * torch.rand_like(maxwell) * maxwell
            grad_std[:, i] = (f(plus) - f(minus)) / s_i
    (-(value + (mu * grad_mu).sum(-1) + (std * grad_std).sum(-1)).sum()).backward()


def gradkit_step(model: VAE, x: Tensor, coupling: bool) -> None:
    """One encoder-gradient step with gradkit's batched measure-valued engine."""
    q = model.posterior(x)
    f = lambda z: model.log_likelihood(x, z)  # noqa: E731
    value = gk.expectation(f, q, 1, estimator="measure_valued", coupling=coupling, plate=True)
    (-value.sum()).backward()


def interleaved_seconds(
    fns: dict[str, Callable[[], None]], repeats: int
) -> dict[str, tuple[float, float]]:
    """(minimum, median) wall time of each function, timed round-robin after one warm-up call.

    Interleaving gives every function the same share of whatever else the machine is doing;
    the minimum is the least disturbed measurement, the median shows the spread.
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


def count_evaluations(model: VAE, step: Callable[[], None], batch: int) -> float:
    """Decoder evaluations per data point that one call of ``step`` makes."""
    rows = []
    decode = model.decode

    def counting(z: Tensor) -> Tensor:
        rows.append(z.numel() // model.z_dim)
        return decode(z)

    model.decode = counting  # type: ignore[method-assign]
    try:
        step()
    finally:
        del model.decode
    return sum(rows) / batch


def encoder_gradient_rows(
    batch_sizes: list[int], z_dim: int, hidden_dim: int, repeats: int
) -> list[dict[str, object]]:
    """Time one encoder-gradient step for each method and batch size."""
    torch.manual_seed(0)
    model = VAE(x_dim=784, hidden_dim=hidden_dim, z_dim=z_dim)
    methods: dict[str, Callable[[Tensor], None]] = {
        "loop (source)": lambda x: source_loop_step(model, x),
        "gradkit, uncoupled": lambda x: gradkit_step(model, x, coupling=False),
        "gradkit, coupled": lambda x: gradkit_step(model, x, coupling=True),
    }
    rows = []
    for batch in batch_sizes:
        x = torch.bernoulli(torch.full((batch, 784), 0.13))

        def call(step: Callable[[Tensor], None], x: Tensor = x) -> Callable[[], None]:
            def run_step() -> None:
                model.zero_grad(set_to_none=True)
                step(x)

            return run_step

        calls = {method: call(step) for method, step in methods.items()}
        seconds = interleaved_seconds(calls, repeats)
        loop_time = seconds["loop (source)"][0]
        for method, (fastest, median) in seconds.items():
            rows.append(
                {
                    "batch": batch,
                    "z_dim": z_dim,
                    "method": method,
                    "evaluations_per_point": count_evaluations(model, calls[method], batch),
                    "ms_per_step": 1e3 * fastest,
                    "ms_median": 1e3 * median,
                    "speedup_vs_loop": loop_time / fastest,
                }
            )
    return rows


def training_rows(batch: int, z_dim: int, hidden_dim: int, repeats: int) -> list[dict[str, object]]:
    """Images per second of one full training step for each estimator."""
    configs = {
        "pathwise": ("pathwise", 1, {}),
        "score function, leave-one-out, 4 samples": (
            "score_function",
            4,
            {"baseline": gk.baselines.LeaveOneOut()},
        ),
        "measure-valued, coupled": ("measure_valued", 1, {"coupling": True}),
        "measure-valued, uncoupled": ("measure_valued", 1, {"coupling": False}),
    }
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((batch, 784), 0.13))
    steps = {}
    for label, (estimator, num_samples, options) in configs.items():
        model = VAE(x_dim=784, hidden_dim=hidden_dim, z_dim=z_dim)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(model=model, optimizer=optimizer, estimator=estimator, s=num_samples, o=options):
            gradkit.models.training_step(
                model, optimizer, x, estimator=estimator, num_samples=s, **o
            )

        steps[label] = step
    return [
        {
            "estimator": label,
            "batch": batch,
            "ms_per_step": 1e3 * fastest,
            "ms_median": 1e3 * median,
            "images_per_second": batch / fastest,
        }
        for label, (fastest, median) in interleaved_seconds(steps, repeats).items()
    ]


def machine() -> dict[str, object]:
    """What produced the numbers."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
        "torch": torch.__version__,
        "gradkit": gk.__version__,
        "python": platform.python_version(),
    }


def run(out: Path = OUT, *, quick: bool = False) -> None:
    """Run the benchmark, print the tables, write CSVs, a PNG and a JSON record under ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [8] if quick else [8, 32, 128, 512]
    hidden = 32 if quick else 400
    repeats = 1 if quick else 7
    grads = pd.DataFrame(encoder_gradient_rows(sizes, z_dim=20, hidden_dim=hidden, repeats=repeats))
    train = pd.DataFrame(
        training_rows(8 if quick else 128, z_dim=20, hidden_dim=hidden, repeats=repeats)
    )
    pd.options.display.float_format = "{:.2f}".format
    print(f"Measure-valued encoder-gradient step (z_dim 20, hidden {hidden}):")
    print(grads.to_string(index=False))
    print(f"\nFull training step, batch {train['batch'].iloc[0]}:")
    print(train.to_string(index=False))
    write_results(
        out,
        "mvd_vae_encoder_gradient",
        grads,
        meta={"quick": quick, "sizes": {"batch_sizes": sizes, "hidden_dim": hidden}},
    )
    train.to_csv(out / "mvd_vae_training.csv", index=False)
    (out / "mvd_vae.json").write_text(
        json.dumps({"benchmark": "mvd_vae", "quick": quick, **machine()}, indent=2) + "\n"
    )
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method, rows in grads.groupby("method", sort=False):
        ax.plot(rows["batch"], rows["ms_per_step"], "o-", label=method)
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="ms per encoder-gradient step")
    ax.legend()
    fig.savefig(out / "mvd_vae.png", bbox_inches="tight", dpi=150)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_mvd_vae", description=__doc__)
    parser.add_argument("--out", type=Path, default=OUT, help="folder for the CSV/PNG/JSON")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (to test the script)")
    args = parser.parse_args(argv)
    run(args.out, quick=args.quick)


if __name__ == "__main__":
    main()
