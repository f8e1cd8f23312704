"""The split backward (an input pass, then deferred weight passes) where a parameter's gradient
cannot simply wait: a weight computed from a parameter (a cast, a scaled embedding, a
parametrization) and a parameter with gradient hooks. Every parameter's gradient, and what
every hook saw, equal those of the same model's whole backward."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

from fastpar.nn import GRU, LSTM
from fastpar.parallel.pipeline import OutputOnly, Pipeline
from fastpar.parallel.pipeline.split_backward import DeferredWeights, weight_split
from fastpar.testing.distributed import run_multiprocess

VOCAB, D = 11, 8


class _CastNorm(nn.Module):
    """A bfloat16 LayerNorm computed in float32 (its weight and bias are casts)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D).to(torch.bfloat16)
        nn.init.normal_(self.norm.weight)
        nn.init.normal_(self.norm.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.norm.weight.float(), self.norm.bias.float()
        return F.layer_norm(x, [D], weight, bias)


class _ScaledEmbedding(nn.Module):
    """An embedding scaled by sqrt(D), as tied input/output embeddings often are."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(VOCAB, D))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.table * D**0.5)


def _cast_norm() -> nn.Module:
    return nn.Sequential(nn.Embedding(VOCAB, D), _CastNorm(), nn.Linear(D, 4))


def _scaled_embedding() -> nn.Module:
    return nn.Sequential(_ScaledEmbedding(), nn.LayerNorm(D), nn.Linear(D, 4))


def _weight_norm() -> nn.Module:
    # Both parametrized: the embedding's and the LayerNorm's weight are computed per forward.
    return nn.Sequential(
        parametrizations.weight_norm(nn.Embedding(VOCAB, D)),
        parametrizations.weight_norm(nn.LayerNorm(D), dim=None),
        nn.Linear(D, 4),
    )


def _gradients(model: nn.Module, ids: torch.Tensor, split: bool) -> dict[str, torch.Tensor]:
    """Every parameter's gradient after one backward, whole or split (then the W pass)."""
    grad = torch.randn(*ids.shape, 4, generator=torch.Generator().manual_seed(1))
    deferred = DeferredWeights()
    if split:
        with weight_split(model, deferred, "stage split"):
            out = model(ids)
    else:
        out = model(ids)
    out.backward(grad)
    deferred.run()
    assert deferred.jobs == []
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("make", [_cast_norm, _scaled_embedding, _weight_norm])
def test_computed_weights_get_the_whole_backwards_gradients(make: Callable[[], nn.Module]) -> None:
    ids = torch.randint(0, VOCAB, (5, 3))
    torch.manual_seed(2)
    whole = _gradients(make(), ids, split=False)
    torch.manual_seed(2)
    split = _gradients(make(), ids, split=True)
    assert whole.keys() == split.keys()
    for name, want in whole.items():
        assert split[name] is not None, name  # the parameter, not the computed weight
        torch.testing.assert_close(split[name], want, rtol=1e-6, atol=1e-6, msg=name)


def _hooked_model() -> tuple[nn.Module, list[tuple[str, torch.Tensor]]]:
    """A model whose every split op has a parameter with hooks (the LayerNorm's weight and the
    head's bias have none: theirs still wait): tensor hooks that mask or scale the gradient
    (raising on None, as a typical hook would) and post-accumulate hooks that record `.grad`
    and clip it in place. Returns the model and the hooks' record."""
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Embedding(VOCAB, D),
        nn.LayerNorm(D),
        nn.Linear(D, D),
        OutputOnly(LSTM(D, D, backend="torch")),
        nn.Linear(D, 4),
    )
    seen: list[tuple[str, torch.Tensor]] = []
    frozen_rows = torch.ones(VOCAB, 1)
    frozen_rows[2:5] = 0
    model[0].weight.register_hook(lambda g: g * frozen_rows)
    model[1].bias.register_hook(lambda g: g * 0.5)
    model[2].weight.register_hook(lambda g: g.clamp(-0.1, 0.1))
    model[3].module.weight_hh_l0.register_hook(lambda g: g * 2)

    def post(name: str) -> Callable[[Any], None]:
        def hook(param: nn.Parameter) -> None:
            seen.append((name, param.grad.clone()))
            param.grad.clamp_(-1, 1)

        return hook

    model[2].bias.register_post_accumulate_grad_hook(post("linear bias"))
    model[4].weight.register_post_accumulate_grad_hook(post("head weight"))
    return model, seen


def test_parameter_hooks_see_and_change_the_gradient_as_in_the_whole_backward() -> None:
    ids = torch.randint(0, VOCAB, (5, 3))
    model, whole_seen = _hooked_model()
    whole = _gradients(model, ids, split=False)
    model, split_seen = _hooked_model()
    split = _gradients(model, ids, split=True)
    for name, want in whole.items():
        torch.testing.assert_close(split[name], want, rtol=1e-6, atol=1e-6, msg=name)
    assert sorted(n for n, _ in split_seen) == sorted(n for n, _ in whole_seen)
    for name, got in split_seen:
        want = next(g for n, g in whole_seen if n == name)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=name)


def test_a_hook_registered_after_the_forward_runs_in_the_backward() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    deferred = DeferredWeights()
    with weight_split(layer, deferred, "stage late hook"):
        y = layer(x)
    layer.weight.register_hook(lambda g: g * 0)  # between forward and backward
    y.sum().backward()
    deferred.run()
    torch.testing.assert_close(layer.weight.grad, torch.zeros(3, 4))
    torch.testing.assert_close(layer.bias.grad, torch.full((3,), 2.0))  # still deferred


def _late_hook_gradients(make: Callable[[], nn.Module], split: bool) -> dict[str, torch.Tensor]:
    """Gradients after one backward (whole, or split then the W pass) with a hook on W_hh that
    doubles and records the gradient, registered between the forward and the backward."""
    torch.manual_seed(6)
    model = make()
    x = torch.randn(5, 3, D, requires_grad=True)
    deferred = DeferredWeights()
    with weight_split(model, deferred, "stage late hook") if split else contextlib.nullcontext():
        out, _ = model(x)
    seen: list[torch.Tensor] = []
    model.weight_hh_l0.register_hook(lambda g: seen.append(g.clone()) or g * 2)
    out.backward(torch.randn_like(out))
    deferred.run()
    assert len(seen) == 1
    return {"seen": seen[0], "x": x.grad} | {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "make",
    [lambda: LSTM(D, D, backend="torch"), lambda: LSTM(D, D, backend="triton"),
     lambda: GRU(D, D, backend="triton")],
    ids=["lstm-torch", "lstm-triton", "gru-triton"],
)  # fmt: skip
def test_a_hook_registered_on_a_recurrent_weight_after_the_forward_runs_in_the_backward(
    make: Callable[[], nn.Module],
) -> None:
    """The recurrences decide at the forward whether W_hh's gradient waits; a hook registered on
    it afterwards must still see, and may replace, the gradient, as in a whole backward."""
    whole = _late_hook_gradients(make, split=False)
    split = _late_hook_gradients(make, split=True)
    for name, want in whole.items():
        torch.testing.assert_close(split[name], want, rtol=1e-5, atol=1e-5, msg=name)


# --- hooks on a parameter's gradient-accumulation node ------------------------------------------
#
# Four ways to hook a parameter's gradient: a tensor hook and a post-accumulate hook (seen by
# `deferrable`), and a pre-hook or a hook on its AccumulateGrad node (invisible to it: autograd
# offers no way to ask a node for its hooks). Each records what it saw per parameter; the tensor
# hook and the node's pre-hook also halve the gradient. The reference is a whole backward.

Record = dict[str, list[torch.Tensor]]


def _accumulate_grad_node(param: nn.Parameter) -> Any:
    return param.view_as(param).grad_fn.next_functions[0][0]


def _hook(kind: str, name: str, param: nn.Parameter, seen: Record) -> Any:
    """Hooks `param` the `kind` way; returns what must be held for the hook to live (the node)."""
    record = seen.setdefault(name, []).append
    if kind == "tensor":
        return param.register_hook(lambda g: record(g.clone()) or g * 0.5)
    if kind == "post-accumulate":
        return param.register_post_accumulate_grad_hook(lambda p: record(p.grad.clone()))
    node = _accumulate_grad_node(param)
    if kind == "node-pre":
        node.register_prehook(lambda grads: record(grads[0].clone()) or (grads[0] * 0.5,))
    else:  # "node-post": (grad_inputs, grad_outputs); an AccumulateGrad has no grad_inputs
        node.register_hook(lambda _, grads: record(grads[0].clone()))
    return node


HOOK_KINDS = ["tensor", "post-accumulate", "node-pre", "node-post"]


def _shared_layer_gradients(kind: str, split: bool) -> tuple[Record, dict[str, torch.Tensor]]:
    """A Linear applied twice (its parameters reach the W pass from two jobs), every parameter
    hooked; two backwards. Returns what the hooks saw and the gradients."""
    torch.manual_seed(8)
    inner, head = nn.Linear(D, D), nn.Linear(D, 3)
    model = nn.ModuleDict({"inner": inner, "head": head})
    seen: Record = {}
    held = [_hook(kind, n, p, seen) for n, p in model.named_parameters()]
    for _ in range(2):
        x = torch.randn(4, D)
        deferred = DeferredWeights()
        with weight_split(model, deferred, "stage shared") if split else contextlib.nullcontext():
            out = head(torch.tanh(inner(torch.tanh(inner(x)))))
        out.backward(torch.randn_like(out))
        deferred.run()
    del held
    return seen, {n: p.grad for n, p in model.named_parameters()}


def _assert_same(got: Record, want: Record) -> None:
    assert {n: len(g) for n, g in got.items()} == {n: len(g) for n, g in want.items()}
    for name, grads in want.items():
        for call, (g, w) in enumerate(zip(got[name], grads, strict=True)):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6, msg=f"{name} call {call}")


@pytest.mark.parametrize("kind", HOOK_KINDS)
def test_a_hooked_shared_parameter_sees_its_whole_gradient_once_per_backward(kind: str) -> None:
    whole_seen, whole = _shared_layer_gradients(kind, split=False)
    split_seen, split = _shared_layer_gradients(kind, split=True)
    assert all(len(calls) == 2 for calls in whole_seen.values())  # the reference: once each
    _assert_same(split_seen, whole_seen)
    for name, want in whole.items():
        torch.testing.assert_close(split[name], want, rtol=1e-6, atol=1e-6, msg=name)


def _late_node_hook(split: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A pre-hook on W's node registered after the forward, the node not held: what the forward
    left (the graph; the split's hold on W) keeps it, the output is gone before the W pass."""
    torch.manual_seed(9)
    layer = nn.Linear(D, 3)
    x = torch.randn(4, D)
    deferred = DeferredWeights()
    with weight_split(layer, deferred, "stage node hook") if split else contextlib.nullcontext():
        out = layer(x)
    seen: list[torch.Tensor] = []
    _accumulate_grad_node(layer.weight).register_prehook(
        lambda grads: seen.append(grads[0].clone()) or (grads[0] * 3,)
    )
    out.backward(torch.ones_like(out))
    del out
    deferred.run()
    return seen, layer.weight.grad


def test_a_node_hook_held_only_by_the_graph_runs_in_the_weight_pass() -> None:
    whole_seen, whole = _late_node_hook(split=False)
    split_seen, split = _late_node_hook(split=True)
    assert len(whole_seen) == len(split_seen) == 1
    torch.testing.assert_close(split_seen[0], whole_seen[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(split, whole, rtol=1e-6, atol=1e-6)


def _hooked_pipeline_run(
    rank: int, world_size: int, kind: str, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> list[tuple[Record, dict[str, torch.Tensor]]]:
    """What every hook saw and the gradients after one step, by a whole backward per
    micro-batch and by a one-rank zbv pipeline (two chunks, W passes deferred)."""
    results = []
    for piped in (False, True):
        torch.manual_seed(10)
        model = nn.Sequential(
            nn.Linear(D, D), nn.Tanh(), nn.LayerNorm(D), nn.Linear(D, D), nn.Tanh(),
            nn.Linear(D, 3),
        )  # fmt: skip
        seen: Record = {}
        held = [_hook(kind, n, p, seen) for n, p in model.named_parameters()]
        loss_fn = nn.MSELoss(reduction="sum")
        if piped:
            pipe = Pipeline([model[:3], model[3:]], stage_index=[0, 1], num_stages=2,
                            schedule="zbv", loss_fn=loss_fn, loss_reduction="sum",
                            num_microbatches=len(batches), timeout_s=60)  # fmt: skip
            pipe.step([x for x, _ in batches], [y for _, y in batches])
        else:
            for x, y in batches:
                loss_fn(model(x), y).backward()
        del held
        results.append((seen, {n: p.grad for n, p in model.named_parameters()}))
    return results


@pytest.mark.parametrize("kind", HOOK_KINDS)
def test_parameter_hooks_in_a_zero_bubble_pipeline_run_as_in_a_whole_backward(kind: str) -> None:
    generator = torch.Generator().manual_seed(11)
    batches = [(torch.randn(b, D, generator=generator), torch.randn(b, 3, generator=generator))
               for b in (2, 3, 4)]  # fmt: skip
    [[(whole_seen, whole), (piped_seen, piped)]] = run_multiprocess(
        _hooked_pipeline_run, 1, args=(kind, batches), timeout=120
    )
    assert all(len(calls) == len(batches) for calls in whole_seen.values())
    _assert_same(piped_seen, whole_seen)
    for name, want in whole.items():
        torch.testing.assert_close(piped[name], want, rtol=1e-5, atol=1e-6, msg=name)
