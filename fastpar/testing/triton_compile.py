"""Compile a Triton kernel for an H100 (sm_90) on a machine without a GPU, and report its
registers, spills and shared memory as `ptxas -v` (the copy bundled with Triton) sees them.

The Triton interpreter that runs kernels on the CPU enforces none of the GPU's limits; this is
how a CPU-only CI still catches code that fails to compile for the GPU, or that spills.

Under the interpreter (`TRITON_INTERPRET=1`) `@triton.jit` yields interpreted functions that
cannot be compiled, so kernels are then compiled in a child process without that variable; the
kernel must be importable as `module.name` (a module-level function).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class KernelReport:
    """What ptxas says about one compiled kernel configuration."""

    name: str
    registers: int
    spills: int  # bytes spilled to local memory by stores + loads; 0 is the goal
    shared_bytes: int  # static shared memory chosen by Triton (its pipelining buffers)
    num_warps: int
    num_stages: int

    @property
    def programs_per_sm(self) -> int:
        """Programs (CTAs) one sm_90 SM holds at once: registers, shared memory and warps."""
        return sm90_programs_per_sm(self.registers, self.shared_bytes, self.num_warps)


# sm_90 limits per SM (CUDA occupancy calculator): 64K registers allocated per warp in units of
# 256, 228 KiB of shared memory of which 1 KiB is reserved per program, 64 warps, 32 programs.
_SM90_REGISTERS = 65536
_SM90_SHARED = 233472
_SM90_WARPS = 64
_SM90_PROGRAMS = 32


def sm90_programs_per_sm(registers: int, shared_bytes: int, num_warps: int) -> int:
    """How many programs of this footprint fit on one sm_90 SM at once (0: none fits)."""
    per_warp = -(-registers * 32 // 256) * 256
    by_regs = _SM90_REGISTERS // max(1, per_warp * num_warps)
    by_smem = _SM90_SHARED // (shared_bytes + 1024)
    return min(by_regs, by_smem, _SM90_WARPS // num_warps, _SM90_PROGRAMS)


@dataclass(frozen=True)
class CompileJob:
    """One kernel configuration to compile: the arguments of `compile_for_sm90`."""

    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    divisible_by_16: tuple[str, ...] = ()


def _bundled_ptxas() -> str:
    import triton.backends.nvidia as nvidia_backend

    path = os.path.join(os.path.dirname(nvidia_backend.__file__), "bin", "ptxas")
    if not os.path.exists(path):
        raise RuntimeError(f"Triton's bundled ptxas is missing at {path}; reinstall triton")
    return path


_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas_verbose(text: str) -> tuple[int, int]:
    """Registers and spilled bytes (stores + loads) from `ptxas -v` output for one kernel."""
    regs = _REGS.search(text)
    spill = _SPILL.search(text)
    if regs is None or spill is None:
        raise ValueError(f"unexpected ptxas -v output:\n{text}")
    return int(regs.group(1)), int(spill.group(1)) + int(spill.group(2))


def _python_function(fn: Any) -> Any:
    # JITFunction and InterpretedFunction both keep the decorated Python function as `.fn`.
    return getattr(fn, "fn", fn)


def _is_interpreted(fn: Any) -> bool:
    return type(fn).__name__ == "InterpretedFunction"


def compile_all_for_sm90(jobs: Sequence[CompileJob]) -> list[KernelReport]:
    """`compile_for_sm90` for each job; one child process for all of them under the
    interpreter."""
    if not any(_is_interpreted(job.fn) for job in jobs):
        return [
            compile_for_sm90(
                j.fn, j.signature, j.constexprs, j.num_warps, j.num_stages, j.divisible_by_16
            )
            for j in jobs
        ]
    payload = [
        {
            "module": _python_function(j.fn).__module__,
            "name": _python_function(j.fn).__name__,
            "signature": j.signature,
            "constexprs": j.constexprs,
            "num_warps": j.num_warps,
            "num_stages": j.num_stages,
            "divisible_by_16": list(j.divisible_by_16),
        }
        for j in jobs
    ]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    result = subprocess.run(
        [sys.executable, "-m", "fastpar.testing.triton_compile"],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"compiling for sm_90 failed:\n{result.stderr[-6000:]}")
    return [KernelReport(**report) for report in json.loads(result.stdout)]


def compile_for_sm90(
    fn: Any,
    signature: dict[str, str],
    constexprs: dict[str, Any] | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    divisible_by_16: Sequence[str] = (),
) -> KernelReport:
    """Compile `fn` (a `triton.jit` function) for sm_90 and run `ptxas -v` on its PTX.

    Arguments:
        fn: the `@triton.jit` kernel.
        signature: Triton type per argument, e.g. {"x_ptr": "*fp32", "n": "i32"}; constexpr
            arguments may be left out (they are taken from `constexprs`).
        constexprs: values of the constexpr arguments.
        num_warps, num_stages: the launch configuration to compile.
        divisible_by_16: arguments to specialise as multiples of 16, as a launch does for
            16-byte aligned pointers and integer values divisible by 16.

    Returns:
        A `KernelReport`. Raises whatever Triton raises when the kernel does not compile for the
        GPU (for example a `tl.dot` with a dimension under 16).
    """
    if _is_interpreted(fn):
        job = CompileJob(
            fn, signature, dict(constexprs or {}), num_warps, num_stages, tuple(divisible_by_16)
        )
        return compile_all_for_sm90([job])[0]
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = dict(constexprs or {})
    signature = dict(signature)
    for key in constexprs:
        signature.setdefault(key, "constexpr")
    names = list(fn.arg_names)
    unknown = [name for name in divisible_by_16 if name not in names]
    if unknown:
        raise ValueError(f"divisible_by_16 names {unknown}, not arguments of {fn.__name__}")
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in divisible_by_16}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = os.path.join(tmp, "kernel.ptx")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        result = subprocess.run(
            [_bundled_ptxas(), "-v", "--gpu-name", "sm_90a", ptx_path, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=False,
        )
    if result.returncode != 0:
        raise RuntimeError(f"ptxas failed for {fn.__name__}:\n{result.stderr}")
    registers, spills = parse_ptxas_verbose(result.stderr + result.stdout)
    return KernelReport(
        name=getattr(fn, "__name__", str(fn)),
        registers=registers,
        spills=spills,
        shared_bytes=int(compiled.metadata.shared),
        num_warps=num_warps,
        num_stages=num_stages,
    )


def _main() -> None:
    # Child-process side of compile_all_for_sm90: JSON jobs on stdin, JSON reports on stdout.
    import importlib

    reports = []
    for job in json.loads(sys.stdin.read()):
        fn = getattr(importlib.import_module(job["module"]), job["name"])
        report = compile_for_sm90(
            fn,
            job["signature"],
            job["constexprs"],
            job["num_warps"],
            job["num_stages"],
            job["divisible_by_16"],
        )
        reports.append(asdict(report))
    print(json.dumps(reports))


if __name__ == "__main__":
    _main()
