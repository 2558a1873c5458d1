"""Speed and variance benchmarks for gradkit (``make bench``; ``python -m benchmarks --out DIR``).

Every module ``benchmarks/bench_<name>.py`` is one benchmark. ``python -m benchmarks`` finds them
all and runs each in turn; a module is run through its ``run`` function when it has one::

    def run(out: pathlib.Path, *, quick: bool = False) -> None: ...

and otherwise as ``python -m benchmarks.bench_<name> --out DIR [--quick]``. A benchmark prints a
table and writes, under ``out``, a CSV, a PNG figure and a JSON file with the machine, device and
package versions that produced them (:func:`benchmarks.common.write_results`). ``quick=True``
runs at a tiny size (the tests use it); numbers from a quick run mean nothing.

Peers (Pyro, Storchastic) are optional: a benchmark skips a peer that is not installed and says
so. They run in a fresh subprocess each (:mod:`benchmarks.peers`): importing Storchastic
patches torch globally (``torch.is_tensor``, ``Tensor.to``, argument validation), which must not
touch gradkit's timings or the test session.
"""
