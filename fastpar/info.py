"""`python -m fastpar info`: what this machine offers fastpar, and what fastpar can use here."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

import torch

from fastpar._machine import describe_cores


def _triton_status() -> tuple[bool, str]:
    try:
        import triton
    except ImportError as error:
        return False, f"not importable ({error})"
    return True, triton.__version__


def _nvcc_version() -> str | None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    result = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False)
    lines = [line for line in result.stdout.splitlines() if "release" in line]
    return lines[-1].strip() if lines else "unknown version"


def _devices() -> list[str]:
    devices = [f"cpu: {platform.processor() or platform.machine()}, {describe_cores()}"]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            devices.append(
                f"cuda:{index}: {props.name}, sm_{props.major}{props.minor}, "
                f"{props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"
            )
    return devices


def collect() -> dict[str, object]:
    """Facts about this environment as a flat dictionary of strings, lists and booleans."""
    from fastpar import _native

    native_ok, native_reason = _native.is_available()
    cuda_build, cuda_reason = _native.cuda_build_possible()
    has_triton, triton_version = _triton_status()
    cuda = torch.cuda.is_available()
    dist = torch.distributed.is_available()

    # name -> (usable here, why not when it is not)
    lstm_backends = {
        "torch": (True, "pure PyTorch, any device"),
        "triton (GPU)": (cuda and has_triton, "needs a CUDA device and triton"),
        "triton (interpreter)": (has_triton, "needs triton; runs with TRITON_INTERPRET=1"),
    }
    shared_memory = native_ok and sys.platform == "linux" and os.path.isdir("/dev/shm")
    transports = {
        "shared-memory ring (CPU)": (shared_memory, native_reason or "needs Linux /dev/shm"),
        "pipeline shm pipes (CPU)": (shared_memory, native_reason or "needs Linux /dev/shm"),
        "CUDA-IPC ring (GPU)": (
            native_ok and cuda and cuda_build,
            native_reason or cuda_reason or ("" if cuda else "no CUDA device"),
        ),
        "torch.distributed gloo": (dist and torch.distributed.is_gloo_available(), ""),
        "torch.distributed nccl": (dist and torch.distributed.is_nccl_available(), ""),
    }
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": triton_version,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "CUDA available": cuda,
        "nvcc": _nvcc_version() or "not found",
        "devices": _devices(),
        "native extension": "builds and loads" if native_ok else f"unavailable: {native_reason}",
        "native CUDA sources": "compiled in" if cuda_build else f"skipped: {cuda_reason}",
        "LSTM backends": lstm_backends,
        "comm transports": transports,
    }


def format_report(facts: dict[str, object]) -> str:
    lines = []
    for key, value in facts.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines.extend(f"  {item}" for item in value)
        elif isinstance(value, dict):
            lines.append(f"{key}:")
            for name, (usable, reason) in value.items():
                # The reason explains a "no"; a usable entry needs no excuse.
                status = "yes" if usable else f"no ({reason})" if reason else "no"
                lines.append(f"  {name:<26} {status}")
        else:
            lines.append(f"{key}: {value}")
    return "\n".join(lines)
