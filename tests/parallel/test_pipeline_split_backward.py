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
from fastpar.parallel.pipeline import OutputOnly
from fastpar.parallel.pipeline.split_backward import DeferredWeights, weight_split

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
