"""Loading a state dict into a model that holds a DataParallel, with assign=True: the parent's
load completes, what is outside the wrapper is assigned, the wrapped module is loaded in place
(its Parameters are the ones the gradient hooks hold), and gradients are still averaged. After
close(), and in a copy of the wrapped module, loads are torch's. References: plain torch modules
loaded the same way, and one-process training on every rank's data."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from fastpar.parallel import DataParallel
from fastpar.testing.distributed import run_multiprocess

IN_PLACE_WARNING = "loaded the module that a DataParallel wraps in place"


class Body(nn.Module):
    """An LSTM, a BatchNorm (buffers) and a parameter of its own (torch keeps that one's
    'assign' mark in the metadata entry the parent's load hands the wrapper)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.lstm = nn.LSTM(width, width, batch_first=True)
        self.norm = nn.BatchNorm1d(width)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.lstm(x)[0][:, -1] * self.scale)


class Parent(nn.Module):
    """Linear -> Body (wrapped in a DataParallel when `wrap`) -> Linear."""

    def __init__(self, wrap: bool) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.body: nn.Module = DataParallel(Body(), comm="torch") if wrap else Body()
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(torch.tanh(self.inp(x))))


def _batch(rank: int) -> torch.Tensor:
    return torch.randn(5, 4, 6, generator=torch.Generator().manual_seed(rank))


def _objects(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.state_dict(keep_vars=True))


def _replaced(before: dict[str, torch.Tensor], module: nn.Module) -> dict[str, bool]:
    """Per entry: whether the module holds another tensor object than `before`'s."""
    return {name: value is not before[name] for name, value in _objects(module).items()}


def _parent_assign(rank: int, world_size: int) -> None:
    torch.manual_seed(0)
    parent = Parent(wrap=True)
    torch.manual_seed(1)
    saved = Parent(wrap=False).state_dict(keep_vars=True)  # with torch's metadata
    before = _objects(parent)
    inside = [name for name in before if name.startswith("body.")]
    assert inside and len(inside) < len(before)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parent.load_state_dict(saved, assign=True)
    assert [str(w.message).count(IN_PLACE_WARNING) for w in caught] == [1], caught
    for name, value in _objects(parent).items():
        if name in inside:  # in place: the hooked objects, the state dict's values
            assert value is before[name] and torch.equal(value, saved[name]), name
        else:
            assert value is saved[name], name

    # One step: the wrapped parameters' gradients are the average over the ranks.
    reference = Parent(wrap=False)
    reference.load_state_dict(saved)
    parent(_batch(rank)).sum().backward()
    for r in range(world_size):
        (reference(_batch(r)).sum() / world_size).backward()
    body, reference_body = parent.body.module, reference.body  # type: ignore[union-attr]
    for (name, a), b in zip(body.named_parameters(), reference_body.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)

    # The caller's state dict loads in place into a fresh plain model where the wrapper's part
    # goes; elsewhere as after torch's own load with assign=True (the same steps, all plain).
    fresh = Parent(wrap=False)
    fresh_before = _objects(fresh)
    fresh.load_state_dict(saved)
    ours = _replaced(fresh_before, fresh)
    torch.manual_seed(1)
    theirs_saved = Parent(wrap=False).state_dict(keep_vars=True)
    Parent(wrap=False).load_state_dict(theirs_saved, assign=True)
    theirs_fresh = Parent(wrap=False)
    theirs_before = _objects(theirs_fresh)
    theirs_fresh.load_state_dict(theirs_saved)
    theirs = _replaced(theirs_before, theirs_fresh)
    assert not any(ours[name] for name in inside), ours
    assert {n: r for n, r in ours.items() if n not in inside} == {
        n: r for n, r in theirs.items() if n not in inside
    }
    parent.body.close()  # type: ignore[operator]


def test_a_parents_load_with_assign_loads_the_wrapped_module_in_place() -> None:
    """The wrapper refused from inside the parent's load, after torch had assigned the
    parameters loaded before it: the parent came out half loaded."""
    run_multiprocess(_parent_assign, 2, timeout=60)


def _marked_dict_in_place(rank: int, world_size: int) -> None:
    torch.manual_seed(0)
    parent = Parent(wrap=True)
    saved = Parent(wrap=False).state_dict()
    Parent(wrap=False).load_state_dict(saved, assign=True)  # leaves torch's marks in `saved`
    before = _objects(parent)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parent.load_state_dict(saved)
    # Outside the wrapper, torch's own marks decide (they assign what they mark).
    for name, value in _objects(parent).items():
        assert torch.equal(value, saved[name]), name
        if name.startswith("body."):
            assert value is before[name], name
    parent.body.close()  # type: ignore[operator]


def test_a_parents_in_place_load_of_a_dict_once_loaded_with_assign_is_in_place() -> None:
    """torch's mark left in the dict's metadata made the wrapper refuse a load that asked for
    nothing but in place."""
    run_multiprocess(_marked_dict_in_place, 2, timeout=60)


def _loads_after_close(rank: int, world_size: int) -> None:
    torch.manual_seed(0)
    parent = Parent(wrap=True)
    saved = Parent(wrap=False).state_dict(keep_vars=True)
    parent.body.close()  # type: ignore[operator]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parent.load_state_dict(saved, assign=True)
        body_saved = {n[len("body.") :]: v for n, v in saved.items() if n.startswith("body.")}
        parent.body.load_state_dict(body_saved, assign=True)
    for name, value in _objects(parent).items():
        assert value is saved[name], name


def test_a_closed_wrapper_loads_with_assign_as_torch_does() -> None:
    """Its hooks are gone: the module is a plain one again."""
    run_multiprocess(_loads_after_close, 2, timeout=60)


def _direct_and_copied(rank: int, world_size: int) -> None:
    torch.manual_seed(0)
    body = Body()
    dp = DataParallel(body, comm="torch")
    saved = Body().state_dict(keep_vars=True)
    with pytest.raises(ValueError, match="assign=True"):
        dp.load_state_dict(saved, assign=True)  # asked of the wrapper itself
    before = _objects(body)
    with pytest.warns(UserWarning, match=IN_PLACE_WARNING):
        body.load_state_dict(saved, assign=True)  # the wrapped module: as within a parent
    for name, value in _objects(body).items():
        assert value is before[name] and torch.equal(value, saved[name]), name
    copied = copy.deepcopy(body)  # e.g. an average of the weights: not wrapped
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        copied.load_state_dict(saved, assign=True)
    for name, value in _objects(copied).items():
        assert value is saved[name], name
    dp.close()


def test_the_wrapped_module_loads_in_place_and_its_copies_as_torch_does() -> None:
    run_multiprocess(_direct_and_copied, 2, timeout=60)
