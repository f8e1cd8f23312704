"""How a `DataParallel` loads a state dict: under the plain module's names (no "module."
prefix), also within a parent module's load, and in place while it is open, since its gradient
buckets and hooks hold the wrapped module's Parameter objects, which `assign=True` would
replace (the hooks would stay on the old ones: gradients would silently stop being averaged).

torch's `Module.load_state_dict` hands each module the metadata entry of the state dict it was
given (shared, not copied) and leaves `assign_to_params_buffers` in it; the functions here
remove that mark where they act, so a later load of the same dict elsewhere is not changed."""

from __future__ import annotations

import collections
import warnings
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

ASSIGN = "assign_to_params_buffers"  # the mark torch's load puts in each module's metadata


def refuse_assign() -> None:
    """`DataParallel.load_state_dict(assign=True)` would put new Parameter objects in the
    module, while the buckets and gradient hooks stay on the old ones."""
    raise ValueError(
        "DataParallel cannot load a state dict with assign=True: its gradient buckets and hooks "
        "are bound to the current Parameter objects, which assign would replace (gradients "
        "would no longer be averaged); load with assign=False (in place), or load into the "
        "plain module before wrapping it"
    )


def without_assign_marks(state_dict: Any) -> Any:
    """`state_dict` without the marks an earlier load with assign=True left in its metadata
    (a load of it would otherwise assign without being asked to); the caller's dict unchanged."""
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is None:
        return state_dict
    copy = collections.OrderedDict(state_dict)
    copy._metadata = {  # type: ignore[attr-defined]
        prefix: {key: value for key, value in entry.items() if key != ASSIGN}
        for prefix, entry in metadata.items()
    }
    return copy


def under_module_prefix(
    wrapper: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    *args: Any,
) -> None:
    """Load pre-hook of the wrapper: a parent module's `load_state_dict` looks for the wrapped
    module's entries under prefix + "module.", where `state_dict()` writes them without it.

    The wrapper holds no state of its own: the metadata entry it is handed is the wrapped
    module's (written under `prefix` by `state_dict()`), so torch's mark is removed from it."""
    local_metadata.pop(ASSIGN, None)
    for key in [key for key in state_dict if key.startswith(prefix)]:
        state_dict[prefix + "module." + key[len(prefix) :]] = state_dict.pop(key)


class InPlaceLoads:
    """Load pre-hooks on every submodule of `module` (itself included) that turn a load with
    assign=True into an in-place one: a parent module's load then completes, assigning what is
    outside the wrapper as asked, and loading the wrapped module's Parameters and buffers in
    place (same objects, new values), so that their gradients are still averaged. Says so once
    in a warning. `remove()` takes the hooks off (the module loads as torch's again)."""

    def __init__(self, module: nn.Module) -> None:
        self._active = True
        self._warned = False
        self._handles: list[RemovableHandle] = [
            submodule.register_load_state_dict_pre_hook(self._load_in_place)
            for submodule in module.modules()
        ]

    def _load_in_place(
        self,
        module: nn.Module,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        *args: Any,
    ) -> None:
        # torch's load sets the mark just before the module's `_load_from_state_dict`, which
        # runs its pre-hooks before reading it. Removed, not set to False: the entry may be the
        # caller's, and stays as if no load with assign had passed.
        if self._active and local_metadata.pop(ASSIGN, False) and not self._warned:
            self._warned = True
            warnings.warn(
                "load_state_dict(assign=True) loaded the module that a DataParallel wraps in "
                "place (same Parameter and buffer objects, new values): its gradient buckets and "
                "hooks hold those Parameters, which assign would replace (gradients would no "
                "longer be averaged); modules outside the DataParallel are assigned as asked",
                stacklevel=2,
            )

    def remove(self) -> None:
        self._active = False
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __getstate__(self) -> dict[str, Any]:
        # A copy of the module (copy.deepcopy, pickling) carries the hooks but not the wrapper:
        # there they do nothing, and the copy loads as torch's.
        return {"_active": False, "_warned": False, "_handles": []}
