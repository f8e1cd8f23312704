"""Every kernel configuration the launchers can choose compiles for sm_90 without spilling.

The interpreter that runs the other tests enforces no GPU limit (tl.dot dimensions >= 16,
registers). bench/kernel_report.py compiles each configuration of the benchmark and test shapes
with Triton for an H100 and reads ``ptxas -v``; it runs in a subprocess because Triton compiles
nothing in a process where TRITON_INTERPRET=1 (the decorator then yields interpreted functions).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_configuration_compiles_for_sm90_without_spills(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "kernel_report.py"), "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=900, cwd=ROOT,
    )  # fmt: skip
    assert out.exists(), proc.stdout + proc.stderr
    rows = json.loads(out.read_text())
    kernels = {r["label"].split()[0] for r in rows}
    assert kernels == {"fwd_step", "bwd_step", "fwd_persistent", "bwd_persistent"}
    failed = [r for r in rows if "error" in r]
    assert not failed, failed
    spilled = [(r["label"], r["spills"]) for r in rows if r["spills"] > 0]
    assert not spilled, spilled
    assert proc.returncode == 0, proc.stdout + proc.stderr
