"""bench/gpu_check.py's guarantees, with stand-in stages: rows survive crashes and timeouts, a
crashed benchmark resumes from the next case, one failing row fails the check, and the summary
prints whatever the stages left. (The real stages run in `make test`'s dry run.)"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import gpu_check  # noqa: E402
from gpu_summary import summary  # noqa: E402

# A benchmark of four cases in the shape of bench/lstm.py: a row per case through RowLog,
# --resume skips the rows already written. Case "c2" dies (like a CUDA fault) the first time,
# "c3" hangs when asked to.
FAKE_BENCH = """
import os, sys, time
sys.path.insert(0, {bench!r})
from common import RowLog
log = RowLog(sys.argv[1], ("case", "status", "error"))
done = log.done()
for case in ("c1", "c2", "c3", "c4"):
    if case in done:
        continue
    log.begin(case)
    if case == "c2" and "--resume" not in sys.argv:
        os._exit(9)
    if case == "c3" and os.environ.get("HANG"):
        time.sleep(600)
    log.write({{"case": case, "status": "FAIL" if case == "c4" else "ok"}})
"""


def _check(tmp_path: Path) -> gpu_check.Check:
    return gpu_check.Check(out=tmp_path, dry_run=False, python=sys.executable)


def _fake(tmp_path: Path) -> list[str]:
    script = tmp_path / "fake_bench.py"
    script.write_text(FAKE_BENCH.format(bench=str(BENCH)))
    return [sys.executable, str(script), str(tmp_path / "rows.csv")]


def test_a_crashed_case_is_a_row_and_the_rest_still_run(tmp_path: Path) -> None:
    check = _check(tmp_path)
    status, detail = gpu_check._resumable(check, "fake", _fake(tmp_path), tmp_path / "rows.csv",
                                          timeout=120)  # fmt: skip
    rows = gpu_check.read_rows(tmp_path / "rows.csv")
    assert [(r["case"], r["status"]) for r in rows] == [
        ("c1", "ok"), ("c2", "CRASH"), ("c3", "ok"), ("c4", "FAIL")
    ]  # fmt: skip
    assert "died (exit 9)" in rows[1]["error"]
    assert status == "ok" and "1 crash" in detail
    assert [r["case"] for r in gpu_check.failed_rows(rows)] == ["c2", "c4"]


def test_a_timeout_keeps_earlier_rows_and_names_the_running_case(tmp_path: Path) -> None:
    check = _check(tmp_path)
    command = _fake(tmp_path)
    gpu_check._resumable(check, "fake", command, tmp_path / "rows.csv", timeout=120)
    (tmp_path / "rows.csv").unlink()
    start = time.monotonic()
    os.environ["HANG"] = "1"
    try:
        status, _ = gpu_check._resumable(check, "fake", [*command, "--resume"],
                                         tmp_path / "rows.csv", timeout=8)  # fmt: skip
    finally:
        del os.environ["HANG"]
    assert time.monotonic() - start < 30
    rows = gpu_check.read_rows(tmp_path / "rows.csv")
    assert status == "TIMEOUT"
    assert [(r["case"], r["status"]) for r in rows] == [
        ("c1", "ok"), ("c2", "ok"), ("c3", "TIMEOUT")
    ]  # fmt: skip


def test_every_test_is_a_row_even_when_a_module_runs_out_of_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = tmp_path / "test_sample.py"
    module.write_text(
        textwrap.dedent("""
        import time, pytest
        pytestmark = getattr(pytest.mark, "gpu")  # (spelled so: this file holds no gpu test)
        def test_passes(): pass
        def test_fails(): assert 1 == 2, "one is not two"
        @pytest.mark.skip(reason="not here")
        def test_skipped(): pass
        def test_hangs(): time.sleep(600)
    """)
    )
    broken = tmp_path / "test_broken.py"
    broken.write_text("import no_such_module_anywhere\n")
    monkeypatch.setattr(gpu_check, "gpu_test_modules", lambda: [module, broken])
    monkeypatch.setattr(gpu_check, "TEST_WORKERS", 2)  # side by side, as on the GPU machine
    check = _check(tmp_path / "out")
    # The budget is waited out in full (test_hangs); two pytest processes that import nothing
    # heavy finish the other tests in a second or two.
    status, detail = gpu_check.stage_tests(check, 12)
    assert status == "TIMEOUT" and "test_sample.py" in detail
    rows = {r["case"].rsplit("::", 1)[-1]: r for r in gpu_check.read_rows(check.out / "tests.csv")}
    assert rows["test_passes"]["status"] == "passed"
    assert rows["test_fails"]["status"] == "failed"
    assert "one is not two" in rows["test_fails"]["error"]
    assert rows["test_skipped"]["status"] == "skipped"
    assert rows["test_hangs"]["status"] == "TIMEOUT"
    collect = [r for r in rows.values() if r["case"].endswith("[collect]")]
    assert collect and "no_such_module_anywhere" in collect[0]["error"]
    assert (check.logs / "tests-test_sample.log").read_text().count("test_sample.py") >= 1


def test_exit_status_says_whether_a_check_failed(tmp_path: Path) -> None:
    check = _check(tmp_path)
    check.stage_rows = [{"stage": "lstm", "status": "ok", "failed": 0}]
    assert gpu_check.exit_status(check) == 0
    check.stage_rows.append({"stage": "allreduce", "status": "TIMEOUT", "failed": 0})
    assert gpu_check.exit_status(check) == 3
    check.stage_rows.append({"stage": "tests", "status": "ok", "failed": 2})
    assert gpu_check.exit_status(check) == 1


def test_the_summary_prints_whatever_the_stages_left(tmp_path: Path) -> None:
    gpu_check.append_row(tmp_path / "lstm.csv", ("case", "shape", "impl", "status", "error"),
                         {"case": "x", "shape": "B16 T1024", "impl": "fastpar-auto",
                          "status": "ERROR", "error": "RuntimeError: boom"})  # fmt: skip
    text = summary(tmp_path)
    assert "RuntimeError: boom" in text
    assert "GPU tests: no rows" in text and "all-reduce" in text


def test_gpu_check_sh_rejects_an_unknown_stage() -> None:
    completed = subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh"), "--only", "nosuch", "--python", sys.executable],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert completed.returncode == 2
    assert "invalid choice: 'nosuch'" in completed.stderr


def test_the_gpu_modules_are_found_ops_first() -> None:
    modules = [f"{p.parent.name}/{p.name}" for p in gpu_check.gpu_test_modules()]
    assert modules[0].startswith("ops/")
    assert {"ops/test_lstm_gpu.py", "comm/test_ring_cuda.py"} <= set(modules)
    assert "test_gpu_check.py" not in " ".join(modules)
