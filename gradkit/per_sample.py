r"""Per-example gradients of a network's loss, vectorised with ``torch.func``.

``loss.backward()`` on a mini-batch gives the *summed* gradient
:math:`\sum_b \nabla_w \ell_b(w)`. Many variance-reduction schemes need each term
:math:`\nabla_w \ell_b(w)` on its own: the optimal constant baseline of the score-function
estimator, :math:`b^\star = \mathbb{E}[s^2 f] / \mathbb{E}[s^2]`, needs the per-sample scores
:math:`s_b = \nabla_w \log q(z_b \mid x_b; w)` of an inference or policy network, and so does any
control variate whose coefficient is a per-batch covariance (Mohamed 2015, comments; Mohamed et
al. 2020, §7.4). A Python loop over the batch computes them one backward pass at a time.
:func:`per_sample_grads` instead writes the module as a pure function of its parameters
(``torch.func.functional_call``), differentiates the loss of one example (``torch.func.grad``)
and maps that over the batch (``torch.func.vmap``), as in functorch (He and Zou 2021).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

__all__ = ["per_sample_grads"]

LossFn = Callable[..., Tensor]

_RANDOMNESS = ("error", "different", "same")
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _check_module(module: object) -> dict[str, Tensor]:
    """The trainable parameters of ``module`` (detached), after checking it can be vectorised."""
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"module must be a torch.nn.Module, got {type(module).__name__}; wrap a function of "
            "parameters in an nn.Module, or call torch.func.grad/vmap on it directly"
        )
    for name, sub in module.named_modules():
        if isinstance(sub, _BATCH_NORMS) and sub.training:
            where = f" ('{name}')" if name else ""
            raise ValueError(
                f"module contains {type(sub).__name__}{where} in training mode: its output for one "
                "example depends on the rest of the batch, so per-example gradients are not "
                "defined. Call module.eval() first (running statistics), or use LayerNorm or "
                "GroupNorm"
            )
    params = {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(
            f"{type(module).__name__} has no parameters with requires_grad=True, so there is "
            "nothing to differentiate; unfreeze some with p.requires_grad_(True)"
        )
    return params


def _check_batch(batch: tuple[Tensor, ...], params: dict[str, Tensor]) -> int:
    """The batch size shared by every tensor in ``batch``."""
    if not batch:
        raise ValueError(
            "per_sample_grads needs a batch: call per_sample_grads(module, loss_fn, inputs, "
            "*targets) with tensors whose first dimension indexes the examples"
        )
    for i, t in enumerate(batch):
        if not isinstance(t, Tensor):
            raise TypeError(
                f"batch argument {i} must be a torch.Tensor, got {type(t).__name__}; convert it "
                "with torch.as_tensor (close over non-batched arguments inside loss_fn instead)"
            )
        if t.dim() == 0:
            raise ValueError(
                f"batch argument {i} is a 0-dim tensor; every batch tensor needs a leading "
                "batch dimension (use t.unsqueeze(0) for a single example)"
            )
    sizes = [t.shape[0] for t in batch]
    if len(set(sizes)) > 1:
        shapes = ", ".join(str(tuple(t.shape)) for t in batch)
        raise ValueError(
            f"batch tensors disagree on the batch size (first dimension): shapes {shapes}; "
            "give one row per example in every tensor"
        )
    if sizes[0] == 0:
        raise ValueError("the batch is empty (batch size 0); pass at least one example")
    devices = {p.device for p in params.values()}
    if len(devices) == 1:
        (device,) = devices
        for i, t in enumerate(batch):
            if t.device != device:
                raise ValueError(
                    f"batch argument {i} is on {t.device} but the module's parameters are on "
                    f"{device}; move it with .to({str(device)!r})"
                )
    return sizes[0]


def per_sample_grads(
    module: nn.Module,
    loss_fn: LossFn,
    *batch: Tensor,
    chunk_size: int | None = None,
    randomness: str = "error",
) -> dict[str, Tensor]:
    r"""Gradient of each example's loss with respect to the module's trainable parameters.

    For a batch ``(inputs, *targets)`` of :math:`B` examples computes, for every :math:`b`,

    .. math:: g_b = \nabla_w\, \ell\big(\mathrm{module}_w(x_{b:b+1}),\, y_{b:b+1}, \dots\big),

    i.e. what ``loss_fn(module(inputs[b:b+1]), *(t[b:b+1] for t in targets)).backward()``
    would leave in ``p.grad`` for each example on its own (each example is given a batch
    dimension of size one), but in one vectorised pass (``torch.func.vmap`` over
    ``torch.func.grad`` of ``torch.func.functional_call``), not a Python loop; see
    He and Zou (2021). Their sum over :math:`b` is the gradient of the summed loss, which is
    all that ``loss.backward()`` on the whole batch returns. ``loss_fn`` may be any scalar
    function of the output, e.g. :math:`\log q(z_b \mid x_b; w)` for per-sample scores.

    Buffers (BatchNorm running statistics in eval mode) are used as constants; parameters with
    ``requires_grad=False`` are held fixed and left out of the result.

    Args:
        module: the network; called as ``module(inputs_b)`` with ``inputs_b`` of shape
            ``(1, *inputs.shape[1:])``.
        loss_fn: ``loss_fn(output_b, *targets_b) -> Tensor`` with one element (a scalar, or
            shape ``(1,)`` from ``reduction="none"``).
        *batch: ``inputs`` then any ``targets``, tensors sharing the batch size ``B`` as their
            first dimension and the device of the module's parameters.
        chunk_size: examples per vectorised chunk (bounds memory; ``None`` = all at once).
        randomness: how random operations (dropout) behave under ``vmap``: ``"error"``
            (default), ``"different"`` (independent per example, as in a loop) or ``"same"``.

    Returns:
        dict parameter name -> tensor of shape ``(B, *param.shape)`` (detached), in the dtype
        and on the device of the parameter.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``, ``loss_fn`` is not callable, a batch
            argument is not a tensor, or ``loss_fn`` does not return a tensor.
        ValueError: no batch, a 0-dim or empty batch tensor, batch sizes that disagree, a batch
            tensor on another device, no trainable parameters, BatchNorm in training mode, a
            loss with more than one element, a bad ``chunk_size`` or ``randomness``, or a random
            operation with ``randomness="error"``.

    Example:
        >>> import torch, gradkit as gk
        >>> net = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(5, 3), torch.randn(5, 1)
        >>> g = gk.per_sample_grads(net, torch.nn.functional.mse_loss, x, y)
        >>> g["weight"].shape, g["bias"].shape
        (torch.Size([5, 1, 3]), torch.Size([5, 1]))
        >>> total = torch.nn.functional.mse_loss(net(x), y, reduction="sum")
        >>> torch.allclose(g["weight"].sum(0), torch.autograd.grad(total, net.weight)[0])
        True
    """
    params = _check_module(module)
    if not callable(loss_fn):
        raise TypeError(
            f"loss_fn must be callable as loss_fn(output, *targets) -> scalar tensor, got "
            f"{type(loss_fn).__name__}"
        )
    _check_batch(batch, params)
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if randomness not in _RANDOMNESS:
        raise ValueError(f"randomness must be one of {_RANDOMNESS}, got {randomness!r}")
    buffers = {name: b.detach() for name, b in module.named_buffers()}

    def example_loss(p: dict[str, Tensor], *example: Tensor) -> Tensor:
        inputs, *targets = (t.unsqueeze(0) for t in example)
        loss = loss_fn(functional_call(module, (p, buffers), (inputs,)), *targets)
        if not isinstance(loss, Tensor):
            raise TypeError(
                f"loss_fn must return a torch.Tensor, got {type(loss).__name__}; build the loss "
                "from torch operations on the module's output"
            )
        if loss.numel() != 1:
            raise ValueError(
                f"loss_fn returned shape {tuple(loss.shape)} for one example; it must return one "
                "value (reduce over output dimensions with .sum() or .mean())"
            )
        return loss.reshape(())

    per_example = vmap(
        grad(example_loss),
        in_dims=(None, *([0] * len(batch))),
        chunk_size=chunk_size,
        randomness=randomness,
    )
    try:
        return per_example(params, *batch)
    except RuntimeError as err:
        if "randomness" not in str(err):
            raise
        raise ValueError(
            "the module (or loss_fn) draws random numbers (dropout?) inside per_sample_grads; "
            "call module.eval() to switch dropout off, or pass randomness='different' for an "
            "independent draw per example (as a Python loop would make)"
        ) from err
