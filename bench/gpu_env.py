"""The versions a GPU check ran with: Python, torch, Triton, the CUDA runtime and driver, the GPU
and its SM count. Printed first and kept in the results folder; a piece that cannot be read says
why instead of ending the report.

    python3 bench/gpu_env.py [--out results/versions.txt]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
from pathlib import Path


def _driver_version() -> str:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "nvidia-smi not found"
    try:
        out = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError) as error:
        return f"nvidia-smi failed: {error}"
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def _tool_version(name: str) -> str:
    from gpu_check import find_cuda_tool

    path = find_cuda_tool(name)
    if path is None:
        return "not found"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as error:
        return f"{path}: {error}"
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    return f"{path} ({lines[-1].strip() if lines else 'no version'})"


def lines() -> list[str]:
    out = [f"python    {sys.version.split()[0]} ({platform.machine()})"]
    try:
        import torch
    except Exception as error:  # the report goes on: this is the line that explains the rest
        return [*out, f"torch     cannot be imported: {error}"]
    out.append(f"torch     {torch.__version__} (CUDA runtime {torch.version.cuda})")
    try:
        import triton

        out.append(f"triton    {triton.__version__}")
    except Exception as error:
        out.append(f"triton    cannot be imported: {error}")
    out.append(f"driver    {_driver_version()}")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(index)
            out.append(
                f"gpu {index}     {p.name}, {p.multi_processor_count} SMs, "
                f"sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB"
            )
        out.append(f"cudnn     {torch.backends.cudnn.version()}")
    else:
        out.append("gpu       none visible to torch (torch.cuda.is_available() is False)")
    out.append(f"nvcc      {_tool_version('nvcc')}")
    out.append(f"sanitizer {_tool_version('compute-sanitizer')}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    text = "\n".join(lines())
    print(text, flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
