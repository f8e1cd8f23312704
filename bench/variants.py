"""The recurrent implementations a benchmark compares, built in one place.

Every fastpar kernel variant is its own case ("fastpar-auto", "fastpar-step",
"fastpar-persistent" on a GPU; "fastpar-auto" on a CPU), next to torch's module of the same cell
(torch.nn.LSTM, GRU or RNN; cuDNN on a GPU) with the same weights. "fastpar-auto" is
backend="auto": Triton or torch's kernels as fastpar.ops.auto_backend decides (its row's kernel
column says which); "fastpar-step" and "fastpar-persistent" always run Triton. `fastpar_module`
is the only function that knows how a variant becomes a module, and this file the only one in
bench/ that imports fastpar's kernel choice.
"""

from __future__ import annotations

import torch

BASELINE = "torch.nn.LSTM"
GPU_VARIANTS = ("fastpar-auto", "fastpar-step", "fastpar-persistent")
CPU_VARIANTS = ("fastpar-auto",)
# A benchmark shape's cell -> the class name of its module, in torch.nn and in fastpar.nn.
MODULES = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}


def baseline(cell: str = "lstm") -> str:
    """The baseline case of a cell: torch's module ("torch.nn.GRU")."""
    return f"torch.nn.{MODULES[cell]}"


def torch_module(cell: str = "lstm", **kwargs: object) -> torch.nn.Module:
    """torch's module of a cell; `kwargs` are its constructor arguments."""
    return getattr(torch.nn, MODULES[cell])(**kwargs)


def variants(device: torch.device) -> tuple[str, ...]:
    """The fastpar cases for this device; "step"/"persistent" only where they can be named."""
    if device.type != "cuda":
        return CPU_VARIANTS
    return GPU_VARIANTS


def fastpar_module(variant: str, cell: str = "lstm", **kwargs: object) -> torch.nn.Module:
    """The fastpar module of a case; `kwargs` are torch's constructor arguments for `cell`."""
    import fastpar.nn
    from fastpar.ops import interpreter_active

    module_type = getattr(fastpar.nn, MODULES[cell])
    kernel = variant.removeprefix("fastpar-")
    if kernel == "auto":
        # In Triton's interpreter (the dry run) "auto" would take the CPU path: name the kernels.
        return module_type(**kwargs, backend="triton" if interpreter_active() else "auto")
    if kernel not in ("step", "persistent"):
        raise ValueError(f"unknown fastpar variant {variant!r}; choose from {GPU_VARIANTS}")
    return module_type(**kwargs, backend="triton", kernel=kernel)


def fastpar_lstm(variant: str, **kwargs: object) -> torch.nn.Module:
    """`fastpar_module` of an LSTM case."""
    return fastpar_module(variant, "lstm", **kwargs)


def kernel_name(
    variant: str, batch: int, hidden: int, proj: int, dtype: torch.dtype, device: torch.device,
    cell: str = "lstm",
) -> str:  # fmt: skip
    """What a variant runs at this shape and cell: the Triton kernels forward/backward with their
    tiles (FASTPAR_LSTM_TILES), e.g. "min-traffic persistent/step"; for "fastpar-auto" where
    auto takes torch's kernels, "torch (cuDNN)" on a GPU and "torch" on a CPU (with the reason
    in the log); "n/a: why" where the variant cannot run."""
    from fastpar.ops import interpreter_active
    from fastpar.ops.auto_backend import choose_auto_backend

    kind = "rnn_tanh" if cell == "rnn" else cell  # the benchmarks' RNN is torch's default, tanh
    kernel = variant.removeprefix("fastpar-")
    # In the interpreter (the dry run) "fastpar-auto" names the Triton kernels (fastpar_module).
    if kernel == "auto" and not interpreter_active():
        choice = choose_auto_backend(kind, device, dtype, batch=batch, hidden=hidden, proj=proj)
        if choice.backend == "torch":
            return "torch (cuDNN)" if device.type == "cuda" else "torch"
    if device.type != "cuda" and not interpreter_active():
        return ""
    from fastpar.ops.lstm_config import choose_kernel as choose
    from fastpar.ops.lstm_config import tile_choice

    size = proj or hidden
    try:
        forward = choose(batch, hidden, size, dtype, device, kernel, cell=kind)
        backward = choose(batch, hidden, size, dtype, device, kernel, backward=True, cell=kind)
    except ValueError as error:  # "persistent" named where it does not apply
        return f"n/a: {error}"
    # The tile choice (FASTPAR_LSTM_TILES) tells two runs of the persistent kernels apart.
    return f"{tile_choice()} {forward}/{backward}"
