"""fastpar.nn.LSTM, GRU and RNN under torch.func (grad, vmap, jacrev), eager and inside
torch.compile, against torch's modules in float64 with the same weights.

torch.func cannot differentiate fastpar's custom ops (torch.library gives them an
autograd.Function without setup_context); where a transform would, fastpar makes torch's own
call instead, and where neither can run, an error names the op and what to use instead.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastpar.nn
from tests.ops.lstm_helpers import FP32_ATOL, FP32_RTOL, assert_close, randn

F_IN, H, B, T = 3, 5, 2, 4
# cell: (fastpar's module, torch's module)
CELLS = {
    "LSTM": (fastpar.nn.LSTM, torch.nn.LSTM),
    "GRU": (fastpar.nn.GRU, torch.nn.GRU),
    "RNN": (fastpar.nn.RNN, torch.nn.RNN),
}


def _pair(cell: str, backend: str, **kwargs: object) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A float32 fastpar module and a float64 torch module with the same (seeded) weights."""
    ours_cls, theirs_cls = CELLS[cell]
    torch.manual_seed(0)
    ours = ours_cls(F_IN, H, backend=backend, **kwargs)
    theirs = theirs_cls(F_IN, H, **kwargs).double()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _loss_of_params(model: torch.nn.Module, x: torch.Tensor, cot: torch.Tensor):
    """params -> <output, cot>: the function torch.func.grad differentiates."""

    def loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
        out = torch.func.functional_call(model, params, (x,))[0]
        return (out * cot).sum()

    return loss


def _func_grad_case(cell: str, backend: str, num_layers: int = 2):
    """(ours, the loss of ours, its parameters, the float64 reference gradients)."""
    ours, theirs = _pair(cell, backend, num_layers=num_layers)
    x, cot = randn(T, B, F_IN, seed=1), randn(T, B, H, seed=2)
    params = dict(ours.named_parameters())
    exact = torch.func.grad(_loss_of_params(theirs, x, cot))(dict(theirs.named_parameters()))
    return ours, _loss_of_params(ours, x.float(), cot.float()), params, exact


def _assert_grads(got: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> None:
    assert got.keys() == exact.keys()
    for name, g in got.items():
        assert_close(g, exact[name], FP32_ATOL, FP32_RTOL, "d " + name)


@pytest.mark.parametrize("cell", list(CELLS))
def test_func_grad_matches_torch(cell: str) -> None:
    _, loss, params, exact = _func_grad_case(cell, "torch")
    _assert_grads(torch.func.grad(loss)(params), exact)


@pytest.mark.parametrize("cell", list(CELLS))
def test_compiled_func_grad_matches_eager_and_torch(cell: str) -> None:
    """torch.compile of torch.func.grad (the default backend on CPU): the compiled call cannot
    keep the custom ops (torch.func cannot differentiate them), so torch.compile runs the
    transform eagerly, where the modules make torch's own call; the gradients are torch's."""
    torch._dynamo.reset()
    _, loss, params, exact = _func_grad_case(cell, "auto")
    eager = torch.func.grad(loss)(params)
    compiled = torch.compile(torch.func.grad(loss))(params)
    _assert_grads(compiled, exact)
    _assert_grads(eager, exact)


def test_compiled_fullgraph_func_grad_names_the_op_and_what_to_do() -> None:
    torch._dynamo.reset()
    _, loss, params, _ = _func_grad_case("LSTM", "torch")
    with pytest.raises(Exception, match=r"fastpar::lstm_aten_layer(.|\n)*backend='reference'"):
        torch.compile(torch.func.grad(loss), fullgraph=True)(params)


def test_compiled_fullgraph_func_grad_on_the_reference_backend() -> None:
    """The way the error above points to: the pure-PyTorch backend, in one graph (traced by
    AOTAutograd; Inductor's code generation for its unrolled loop would take minutes here)."""
    torch._dynamo.reset()
    _, loss, params, exact = _func_grad_case("GRU", "reference", num_layers=1)
    compiled = torch.compile(torch.func.grad(loss), backend="aot_eager", fullgraph=True)
    _assert_grads(compiled(params), exact)


@pytest.mark.parametrize("cell", list(CELLS))
def test_func_grad_of_packed_input_names_the_op(cell: str) -> None:
    """Neither runs there: torch's packed call fails under torch.func (torch.nn's modules too)."""
    ours, _ = _pair(cell, "torch")
    x = pack_padded_sequence(randn(T, B, F_IN, seed=1).float(), torch.tensor([T, T - 1]))

    def loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(ours, params, (x,))[0].data.sum()

    op = "lstm_aten_layer" if cell == "LSTM" else "rnn_aten_layer"
    with pytest.raises(NotImplementedError, match=f"fastpar::{op}(.|\n)*backend='reference'"):
        torch.func.grad(loss)(dict(ours.named_parameters()))


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_vmap_over_inputs_matches_torch(cell: str, backend: str) -> None:
    """vmap over a batch of inputs (torch's own module call has no batching rule; the custom
    op runs once per input), each against torch's module on that input."""
    ours, theirs = _pair(cell, backend)
    xs = randn(3, T, B, F_IN, seed=1)
    got = torch.func.vmap(lambda x: ours(x)[0])(xs.float())
    for k, x in enumerate(xs):
        assert_close(got[k], theirs(x)[0], FP32_ATOL, FP32_RTOL, f"output of input {k}")


@pytest.mark.parametrize("cell", list(CELLS))
def test_compiled_fullgraph_vmap_matches_torch(cell: str) -> None:
    """torch.compile(vmap(model), fullgraph=True): vmap does not differentiate, so the custom
    ops run in the graph (Dynamo traces the transform stack, which tells vmap from grad); the
    output of each input and the parameters' gradients against torch's module (float64)."""
    torch._dynamo.reset()
    ours, theirs = _pair(cell, "torch", num_layers=2)
    xs = randn(3, T, B, F_IN, seed=1)
    got = torch.compile(torch.func.vmap(lambda x: ours(x)[0]), backend="aot_eager",
                        fullgraph=True)(xs.float())  # fmt: skip
    got.sum().backward()
    exact = torch.stack([theirs(x)[0] for x in xs])
    exact.sum().backward()
    assert_close(got, exact, FP32_ATOL, FP32_RTOL, "outputs of the inputs")
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert_close(p.grad, q.grad, FP32_ATOL, FP32_RTOL, "d " + name)


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_jacrev_matches_torch(cell: str, backend: str) -> None:
    ours, theirs = _pair(cell, backend)
    x = randn(2, 1, F_IN, seed=1)
    got = torch.func.jacrev(lambda x: ours(x)[0])(x.float())
    exact = torch.func.jacrev(lambda x: theirs(x)[0])(x)
    assert_close(got, exact, FP32_ATOL, FP32_RTOL, "jacobian of the output")


@pytest.mark.parametrize("cell", list(CELLS))
def test_func_grad_on_the_triton_backend_names_the_op(cell: str) -> None:
    _, loss, params, _ = _func_grad_case(cell, "triton")
    op = "lstm_recurrence" if cell == "LSTM" else "cell_recurrence"
    with pytest.raises(NotImplementedError, match=f"fastpar::{op}(.|\n)*backend='reference'"):
        torch.func.grad(loss)(params)
