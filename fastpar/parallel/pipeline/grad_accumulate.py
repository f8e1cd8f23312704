"""Adding a deferred weight gradient into a parameter, as autograd's own accumulation does."""

from __future__ import annotations

from torch import Tensor

__all__ = ["accumulate", "needs_grad"]


def accumulate(param: Tensor, grad: Tensor) -> None:
    """``param.grad += grad`` in param's dtype, or ``param.grad = grad`` when it has none (then
    `grad` itself, where its dtype is param's: give each parameter a tensor of its own)."""
    if param.grad is None:
        param.grad = grad.to(param.dtype)
    else:
        param.grad.add_(grad)


def needs_grad(param: Tensor | None) -> bool:
    """Whether `param` is a tensor that wants a gradient."""
    return param is not None and param.requires_grad
