"""Adding a deferred weight gradient into a parameter, as autograd's own accumulation does."""

from __future__ import annotations

from torch import Tensor

__all__ = ["accumulate", "deferrable", "needs_grad"]


def accumulate(param: Tensor, grad: Tensor) -> None:
    """``param.grad += grad`` in param's dtype, or ``param.grad = grad`` when it has none (then
    `grad` itself, where its dtype is param's: give each parameter a tensor of its own)."""
    if param.grad is None:
        param.grad = grad.to(param.dtype)
    else:
        param.grad.add_(grad)


def deferrable(param: Tensor) -> bool:
    """Whether `param`'s gradient may skip autograd and be added into `.grad` by a weight pass:
    a leaf without gradient hooks. A computed weight (a cast, a scaled or tied embedding, a
    parametrization) must pass its gradient on through autograd to the parameter it came
    from; hooks (`register_hook`, `register_post_accumulate_grad_hook`) must see, and may
    replace, the gradient as autograd accumulates it. Both need it in the input pass."""
    return param.is_leaf and not param._backward_hooks and not param._post_accumulate_grad_hooks


def needs_grad(param: Tensor | None) -> bool:
    """Whether `param` is a tensor that wants a gradient."""
    return param is not None and param.requires_grad
