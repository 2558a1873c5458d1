"""Per-sample gradients: ``gk.per_sample_grads`` (``torch.func``) against a Python loop.

A small network (20 -> 64 -> 64 -> 1, tanh, about 5,600 parameters) and a squared-error loss;
for 10, 100, 1,000 and 10,000 examples, the gradient of each example's loss with respect to
every parameter, computed (i) by :func:`gradkit.per_sample.per_sample_grads`, which maps
``torch.func.grad`` over the batch with ``torch.func.vmap``, and (ii) by a Python loop of one
``torch.autograd.grad`` call per example. The two must agree (checked, ``allclose``); the table
gives both times and the speed-up. Writes ``per_sample.csv/.png/.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
import torch
from torch import Tensor, nn

from benchmarks.common import main_for, time_call, write_results
from gradkit.per_sample import per_sample_grads

__all__ = ["SIZES", "compare", "loop_grads", "network", "plot", "run"]

SIZES = (10, 100, 1_000, 10_000)


def network(seed: int = 0) -> nn.Module:
    """The benchmark's small network, 20 -> 64 -> 64 -> 1 with tanh, from a fixed seed.

    Example:
        >>> sum(p.numel() for p in network().parameters())
        5569
    """
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)
    )


def loop_grads(
    module: nn.Module, loss_fn: Any, inputs: Tensor, targets: Tensor
) -> dict[str, Tensor]:
    """The reference: one ``torch.autograd.grad`` call per example, stacked.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(3, 1)
        >>> g = loop_grads(net, torch.nn.functional.mse_loss, torch.ones(4, 3), torch.ones(4, 1))
        >>> g["weight"].shape
        torch.Size([4, 1, 3])
    """
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    params = [p for p in module.parameters() if p.requires_grad]
    rows = []
    for b in range(inputs.shape[0]):
        loss = loss_fn(module(inputs[b : b + 1]), targets[b : b + 1])
        rows.append(torch.autograd.grad(loss, params))
    return {name: torch.stack([r[i] for r in rows]) for i, name in enumerate(names)}


def compare(sizes: Sequence[int] = SIZES, *, repeats: int = 3, seed: int = 0) -> pd.DataFrame:
    """Time both ways at each batch size and check that they agree.

    Args:
        sizes: batch sizes (numbers of examples).
        repeats: timed repeats of the vectorised call (median); the loop is timed once when it
            has 1,000 examples or more, else ``repeats`` times.
        seed: seed for the network and the data.

    Returns:
        one row per size: ``samples``, ``loop_s``, ``vmap_s``, ``speedup``, ``max_abs_diff``,
        ``agree``, ``parameters``.

    Example:
        >>> compare((3,), repeats=1).agree.tolist()
        [True]
    """
    net = network(seed)
    loss_fn = nn.functional.mse_loss
    count = sum(p.numel() for p in net.parameters())
    rows = []
    for n in sizes:
        generator = torch.Generator().manual_seed(seed + n)
        x = torch.randn(n, 20, generator=generator)
        y = torch.randn(n, 1, generator=generator)
        fast = per_sample_grads(net, loss_fn, x, y)
        slow = loop_grads(net, loss_fn, x, y)
        diff = max((fast[k] - slow[k]).abs().max().item() for k in fast)
        agree = all(torch.allclose(fast[k], slow[k], rtol=1e-4, atol=1e-6) for k in fast)
        vmap_s = time_call(lambda x=x, y=y: per_sample_grads(net, loss_fn, x, y), repeats=repeats)
        loop_s = time_call(
            lambda x=x, y=y: loop_grads(net, loss_fn, x, y),
            warmup=0,
            repeats=1 if n >= 1_000 else repeats,
        )
        rows.append(
            {
                "samples": n,
                "loop_s": loop_s,
                "vmap_s": vmap_s,
                "speedup": loop_s / vmap_s,
                "max_abs_diff": diff,
                "agree": agree,
                "parameters": count,
            }
        )
    return pd.DataFrame(rows)


def plot(table: pd.DataFrame) -> Any:
    """Time against number of examples, both axes logarithmic, with the speed-ups marked.

    Example:
        >>> import pandas as pd
        >>> t = pd.DataFrame({"samples": [10, 100], "loop_s": [0.01, 0.1],
        ...                   "vmap_s": [0.001, 0.002], "speedup": [10.0, 50.0]})
        >>> len(plot(t).axes)
        1
    """
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.loglog(table.samples, table.loop_s, "o-", label="Python loop of autograd.grad")
    ax.loglog(table.samples, table.vmap_s, "s-", label="gk.per_sample_grads (torch.func)")
    for row in table.itertuples():
        ax.annotate(
            f"{row.speedup:.0f}×",
            (row.samples, row.vmap_s),
            textcoords="offset points",
            xytext=(0, -14),
            ha="center",
            fontsize=8,
        )
    ax.set_xlabel("examples in the batch")
    ax.set_ylabel("seconds for all per-example gradients")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig


def run(out: Path, *, quick: bool = False) -> None:
    """Run :func:`compare` and write ``per_sample`` CSV, PNG and JSON to ``out``.

    ``quick`` runs only 10 and 100 examples, timed once.
    """
    sizes = (10, 100) if quick else SIZES
    table = compare(sizes, repeats=1 if quick else 3)
    fig = plot(table)
    write_results(out, "per_sample", table, fig=fig, meta={"quick": quick, "sizes": list(sizes)})
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main_for(run, __doc__.splitlines()[0]))
