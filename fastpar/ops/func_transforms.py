"""fastpar's custom ops under torch.func transforms (grad, vjp, jacrev, jacfwd, jvp, vmap).

torch.library's ``register_autograd`` hands a custom op's formula to autograd as an
``autograd.Function`` without ``setup_context``, and torch.func refuses such a Function under
any transform that differentiates ("it must override the setup_context staticmethod", torch
2.13). So torch.func cannot differentiate fastpar's custom ops; vmap alone runs them (torch's
batching fallback, one call per example). Outside torch.compile the recurrent stacks then make
torch's own module call, which torch.func differentiates (``aten_common.eager_whole_stack``);
where an op would still run, ``check_not_differentiated`` says so and what to use instead.
"""

from __future__ import annotations

import torch
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter

_DIFFERENTIATING = (TransformType.Grad, TransformType.Jvp)

# What to do instead, for the ops on torch's kernels and for the Triton ones.
ATEN_INSTEAD = (
    "Differentiate with torch.autograd.grad or .backward() instead, or use backend='reference' "
    "(pure PyTorch, which torch.func differentiates); outside torch.compile torch.func does "
    "differentiate padded (not packed) input with backend='torch' or 'auto' (torch's own call)."
)
TRITON_INSTEAD = (
    "Differentiate with torch.autograd.grad or .backward() instead, or use backend='reference' "
    "(pure PyTorch, which torch.func differentiates), or, outside torch.compile and with "
    "padded input, backend='torch' (torch's own call)."
)


def differentiating_transform_active() -> bool:
    """Whether a torch.func transform that differentiates (grad, vjp, jacrev, jacfwd, jvp) is
    active, at any level: vmap(grad(f)) and grad(vmap(f)) differentiate, vmap alone does not.

    The stack is walked from the innermost transform down, each popped for the next (``lower``),
    because that is what Dynamo traces (torch 2.13: the current interpreter's key and lower(),
    guarded on the interpreter; it skips ``retrieve_all_functorch_interpreters``), so a compiled
    vmap runs the ops in one graph as an eager one does."""
    if not torch._C._are_functorch_transforms_active():  # the usual case, at once
        return False
    interpreter = retrieve_current_functorch_interpreter()
    if interpreter.key() in _DIFFERENTIATING:
        return True
    with interpreter.lower():
        return differentiating_transform_active()


def check_not_differentiated(op: str, *, differentiable: bool, instead: str) -> None:
    """Raise NotImplementedError, naming ``op`` and what to do ``instead``, when a torch.func
    transform would differentiate it (``differentiable``: some input requires a gradient; under
    torch.compile, where Dynamo cannot read a wrapped tensor's requires_grad, any
    differentiating transform counts)."""
    if not differentiating_transform_active():
        return
    if not (differentiable or torch.compiler.is_compiling()):
        return
    where = " inside torch.compile" if torch.compiler.is_compiling() else ""
    raise NotImplementedError(
        f"torch.func transforms (grad, vjp, jacrev, jacfwd, jvp) cannot differentiate the custom "
        f"op {op}{where}: torch.library registers its backward as an autograd.Function without "
        f"setup_context, which torch.func refuses. {instead}"
    )
