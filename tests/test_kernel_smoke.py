"""Which Triton kernel bodies bench/kernel_smoke.py's cases (the GPU check's compute-sanitizer
stage) reach on the GPU check's machine, so that a dispatcher change cannot silently drop one.

The cases run with fastpar's dispatch answering as on a 132-SM GPU (an H100/H200: no
interpreter, backend="auto" deciding for CUDA) and the four kernel launchers replaced by
recorders of each launch's kernel, grid and constexpr flags; nothing runs, so the outputs are
garbage and each case's own comparison is ignored. (The dry run of `make test` runs the cases
for real in Triton's interpreter, whose tile choices differ.)
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import kernel_smoke  # noqa: E402

GPU_SMS = 132
KERNELS = ("fwd_step", "bwd_step", "fwd_persistent", "bwd_persistent")
CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
# (kernel, flags) that some launch must match: each a body (or a specialisation of one) that
# the sanitizer has to see at least once.
REQUIRED_BODIES: list[tuple[str, dict[str, Any]]] = [
    *[(k, {"CELL": cell}) for k in KERNELS for cell in CELLS],
    *[(k, {"CELL": "lstm", "dtype": dt}) for k in KERNELS for dt in ("float32", "bfloat16")],
    ("fwd_step", {"CELL": "lstm", "dtype": "float16"}),
    ("bwd_step", {"CELL": "lstm", "dtype": "float16"}),
    *[(k, {"CELL": "lstm", "HAS_LENGTHS": True}) for k in KERNELS],
    ("fwd_step", {"CARRY_H": False}),  # a projection
    ("bwd_step", {"HAS_REC": False}),
    *[(k, {"W_RESIDENT": r}) for k in ("fwd_step", "fwd_persistent") for r in (True, False)],
    *[(k, {"REVERSE": r}) for k in ("fwd_persistent", "bwd_persistent") for r in (True, False)],
    ("bwd_step", {"K_SPLIT": 2}),
    ("bwd_step", {"K_SPLIT": 4}),
    *[(k, {"batch_blocks": 2}) for k in KERNELS],
]


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **flags)` records the launch."""

    def __init__(self, name: str, launches: list[dict[str, Any]]) -> None:
        self.name, self.launches = name, launches

    def __getitem__(self, grid: tuple[int, ...]):
        def launch(*args: Any, **flags: Any) -> None:
            # Forward: xg (T, B, G*H) first; backward: dgates (float32) then W_hh.
            data = args[0] if self.name.startswith("fwd") else args[1]
            self.launches.append(
                {**flags, "kernel": self.name, "batch_blocks": grid[0],
                 "dtype": str(data.dtype).removeprefix("torch.")}
            )  # fmt: skip

        return launch


def _dispatch_as_on_gpu(monkeypatch: pytest.MonkeyPatch, launches: list[dict[str, Any]]) -> None:
    import fastpar.nn.recurrent
    import fastpar.ops

    # Imported before the patches: their input checks (CUDA or the interpreter) keep the truth.
    import fastpar.ops.lstm_op
    import fastpar.ops.rnn_op
    from fastpar.ops import auto_backend, lstm_backward, lstm_config, lstm_forward

    for module in (fastpar.ops, lstm_config, lstm_forward, lstm_backward, auto_backend):
        monkeypatch.setattr(module, "interpreter_active", lambda: False)
    for module in (lstm_config, lstm_forward, lstm_backward):
        monkeypatch.setattr(module, "num_sms", lambda device: GPU_SMS)
    choose = auto_backend.choose_auto_backend

    def choose_on_gpu(cell: str, device: torch.device, dtype: torch.dtype, **kwargs: Any):
        return choose(cell, torch.device("cuda"), dtype, **kwargs, num_sms=GPU_SMS)

    monkeypatch.setattr(fastpar.nn.recurrent, "choose_auto_backend", choose_on_gpu)
    for name in KERNELS:
        module = lstm_forward if name.startswith("fwd") else lstm_backward
        monkeypatch.setattr(module, f"_lstm_{name}_kernel", _Recorder(name, launches))


@pytest.fixture(scope="module")
def launches_per_case() -> dict[str, list[dict[str, Any]]]:
    """Each recurrent case's launches on the GPU check's machine."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    recurrent = {
        name: run for name, run in kernel_smoke.cases(device).items() if name.split()[0] in CELLS
    }
    out: dict[str, list[dict[str, Any]]] = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name, run in recurrent.items():
            out[name] = []
            _dispatch_as_on_gpu(monkeypatch, out[name])
            # The recorders computed nothing: the case's comparison is meaningless here.
            with contextlib.suppress(AssertionError):
                run()
    return out


def test_every_recurrent_case_runs_triton_forward_and_backward(launches_per_case) -> None:
    assert launches_per_case, "kernel_smoke lists no recurrent case"
    for name, launches in launches_per_case.items():
        kinds = {launch["kernel"].split("_")[0] for launch in launches}
        assert kinds == {"fwd", "bwd"}, f"{name!r} launched {sorted(kinds)} (torch's kernels?)"


def test_the_cases_reach_every_kernel_body(launches_per_case) -> None:
    launches = [launch for case in launches_per_case.values() for launch in case]
    missing = [
        f"{kernel} {flags}"
        for kernel, flags in REQUIRED_BODIES
        if not any(
            launch["kernel"] == kernel and all(launch.get(k) == v for k, v in flags.items())
            for launch in launches
        )
    ]
    assert not missing, "no sanitizer case reaches:\n" + "\n".join(missing)
