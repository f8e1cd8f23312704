"""The stages of `bench/gpu_check.sh`, each in its own processes with its own time budget.

Only the standard library is imported here, so nothing in torch, Triton or fastpar can stop the
check before it has written what it could. Every stage appends rows under the results folder as
they finish (see each script); this file adds one row per stage to `stages.csv`, a row for the
case a crashed or timed-out process was running, restarts a crashed benchmark from the next
case, and prints the summary last.

    python3 bench/gpu_check.py [--out results] [--dry-run] [--only STAGE ...]

Exit status: 0 all checks passed; 1 a correctness check failed (a test, a benchmark's check
against its baseline, a sanitizer error, the build), or, in a dry run, a stage wrote no rows;
3 nothing failed but a stage ran out of time.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

# Seconds per stage. Their sum stays under 8 minutes; time a stage leaves unused goes to the
# stages after it.
# Measured on the H200 (first run): versions 6 s, build 48, the gpu tests one module at a time
# over 190, lstm 43, allreduce 25, sanitizer 108.
BUDGETS = {
    "versions": 15,
    "build": 70,
    "tests": 160,
    "lstm": 70,
    "lstm-tiles": 35,
    "allreduce": 35,
    "sanitizer": 95,
}
# Test modules run side by side, a quarter of the cores each (their time is mostly compilers).
TEST_WORKERS = max(1, min(4, (os.cpu_count() or 1) // 4))
STAGE_HEADERS = ("stage", "status", "seconds", "budget_s", "rows", "failed", "detail")
FAILED = ("FAIL", "ERROR", "failed", "error", "TIMEOUT", "CRASH")
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck")
CRASH_RETRIES = 3
# The columns of bench/pytest_rows.py and bench/kernel_smoke.py (not imported: they need pytest
# and torch, and this file needs neither).
TEST_HEADERS = ("case", "module", "status", "seconds", "error")
SMOKE_HEADERS = ("case", "tool", "status", "seconds", "error")


def find_cuda_tool(name: str) -> str | None:
    """A CUDA command-line tool on PATH, in $CUDA_HOME/bin or in /usr/local/cuda*/bin."""
    found = shutil.which(name)
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", ""),
             "/usr/local/cuda", *sorted(map(str, Path("/usr/local").glob("cuda-*")))]  # fmt: skip
    for home in homes:
        if home and (Path(home) / "bin" / name).exists():
            return str(Path(home) / "bin" / name)
    return None


@dataclass
class Check:
    out: Path
    dry_run: bool
    python: str
    deadline: float = 0.0
    stage_rows: list[dict[str, object]] = field(default_factory=list)
    warming: subprocess.Popen | None = None
    current: subprocess.Popen | None = None  # the stage's process running now
    side_by_side: list[subprocess.Popen] = field(default_factory=list)  # from start()

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), str(BENCH), *filter(None, [env.get("PYTHONPATH")])]
        )
        env["PYTHONUNBUFFERED"] = "1"
        if self.dry_run:
            env["TRITON_INTERPRET"] = "1"
            env["CUDA_VISIBLE_DEVICES"] = ""  # the same CPU paths on a machine with a GPU
            # With a CUDA build of torch and no visible GPU, torch's extension builder cannot
            # guess the architecture (and raises): name the GPU check's, sm_90.
            env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        env.update(extra)
        return env

    def run(self, name: str, command: list[str], timeout: float, **env: str) -> int | None:
        """Runs `command` with its output in logs/<name>.log (and on the screen); the exit status,
        or None when it outlived `timeout` (its whole process group is killed)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        print(f"$ {' '.join(command)}   [{timeout:.0f} s]", flush=True)
        with open(self.logs / f"{name}.log", "ab") as log:
            process = subprocess.Popen(
                command, cwd=ROOT, env=self.env(**env), stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            self.current = process
            end = time.monotonic() + max(timeout, 1.0)
            assert process.stdout is not None
            os.set_blocking(process.stdout.fileno(), False)
            while True:
                chunk = process.stdout.read()
                if chunk:
                    log.write(chunk)
                    log.flush()
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
                if process.poll() is not None and not chunk:
                    return process.returncode
                if time.monotonic() > end:
                    _kill_group(process)
                    return None
                if not chunk:
                    time.sleep(0.05)

    def start(self, name: str, command: list[str], **env: str) -> subprocess.Popen:
        """Starts `command` in its own process group with its output in logs/<name>.log only
        (for processes that run side by side)."""
        with open(self.logs / f"{name}.log", "ab") as log:
            process = subprocess.Popen(
                command, cwd=ROOT, env=self.env(**env), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.side_by_side.append(process)
        return process

    def start_warming(self) -> None:
        """Compile the LSTM benchmark's kernels in the background (Triton's disk cache) while
        the native extension builds: cold caches cost the timed stage less."""
        command = [self.python, str(BENCH / "lstm.py"), "--warm-only"]
        command += ["--device", "cpu", "--scale", "tiny"] if self.dry_run else ["--device", "cuda"]
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / "warm.log", "ab") as log:
            self.warming = subprocess.Popen(
                command, cwd=ROOT, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def stop_warming(self) -> None:
        """Before anything is timed: compiling next to a timed kernel would slow it."""
        if self.warming is not None:
            _kill_group(self.warming)
            self.warming = None

    def budget(self, stage: str, stages: list[str]) -> float:
        """This stage's seconds: its own budget plus what earlier stages left unused."""
        later = stages[stages.index(stage) + 1 :]
        left = self.deadline - time.monotonic() - sum(BUDGETS[s] for s in later)
        return max(left, 10.0)


def _kill_group(process: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_row(path: Path, headers: tuple[str, ...], row: dict[str, object]) -> None:
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(headers)
        writer.writerow([row.get(h, "") for h in headers])


def note_running(csv_path: Path, status: str, detail: str) -> bool:
    """A row for the case that was running when its process died or was stopped; whether there
    was one."""
    running = csv_path.with_name(csv_path.name + ".running")
    if not running.exists():
        return False
    case = running.read_text().strip()
    running.unlink()
    with open(csv_path, newline="") as f:
        headers = tuple(next(csv.reader(f)))
    row = {"case": case, "status": status, "error": detail}
    if "module" in headers:
        row["module"] = case.split("::")[0]
    append_row(csv_path, headers, row)
    return True


def failed_rows(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [r for r in rows if r.get("status") in FAILED]


# ---- stages ---------------------------------------------------------------------------------


def stage_versions(check: Check, timeout: float) -> tuple[str, str]:
    rc = check.run("versions", [check.python, str(BENCH / "gpu_env.py"), "--out",
                                str(check.out / "versions.txt")], timeout)  # fmt: skip
    return ("ok" if rc == 0 else _status(rc)), ""


def stage_build(check: Check, timeout: float) -> tuple[str, str]:
    rc = check.run("build", [check.python, "-m", "fastpar", "build"], timeout)
    return ("ok" if rc == 0 else "FAIL" if rc is not None else "TIMEOUT"), f"exit {rc}"


def gpu_test_modules() -> list[Path]:
    """Test modules with tests marked gpu: ops first (the most to learn), then the rest; within
    a folder, torch.compile's modules last (Inductor's cold compilations are the slowest)."""
    order = ("ops", "nn", "comm", "parallel")
    found = [p for p in sorted((ROOT / "tests").rglob("test_*.py"))
             if re.search(r"mark\.gpu\b", p.read_text(errors="replace"))]  # fmt: skip
    return sorted(found, key=lambda p: (order.index(p.parent.name) if p.parent.name in order
                                        else len(order), "compile" in p.name, str(p)))  # fmt: skip


def _relative(module: Path) -> Path:
    """A test module's path as pytest and the rows name it: relative to the repository."""
    return module.relative_to(ROOT) if module.is_relative_to(ROOT) else module


def _pytest_module(check: Check, module: Path) -> tuple[list[str], Path, str]:
    """The command, rows file and log name of one module's pytest run."""
    relative = _relative(module)
    command = [check.python, "-m", "pytest", "-m", "gpu", str(relative), "-p", "pytest_rows",
               "-rA", "-p", "no:cacheprovider",
               f"--junitxml={check.out / 'junit' / (relative.stem + '.xml')}"]  # fmt: skip
    return command, check.out / "junit" / f"{relative.stem}.csv", f"tests-{relative.stem}"


def _merge_rows(parts: list[Path], into: Path) -> None:
    """One tests.csv, module by module, from each module's own rows file."""
    for part in parts:
        for row in read_rows(part):
            append_row(into, TEST_HEADERS, row)


def stage_tests(check: Check, timeout: float) -> tuple[str, str]:
    """Every module with gpu-marked tests, in its own pytest process, TEST_WORKERS at a time:
    most of their time is Triton's and Inductor's compilers on the CPU, which the machine's
    cores share well, and each module's rows and log stay its own."""
    (check.out / "junit").mkdir(parents=True, exist_ok=True)
    check.logs.mkdir(parents=True, exist_ok=True)
    queue = gpu_test_modules()
    end = time.monotonic() + timeout
    running: dict[Path, tuple[subprocess.Popen, Path]] = {}
    parts, timed_out = [], []
    print(f"{len(queue)} modules, {TEST_WORKERS} at a time; each module's output in "
          "logs/tests-<module>.log", flush=True)  # fmt: skip
    while queue or running:
        while queue and len(running) < TEST_WORKERS:
            module = queue.pop(0)
            command, rows_csv, log_name = _pytest_module(check, module)
            parts.append(rows_csv)
            running[module] = (check.start(log_name, command, FASTPAR_TEST_ROWS=str(rows_csv)),
                               rows_csv)  # fmt: skip
        for module, (process, rows_csv) in list(running.items()):
            rc = process.poll()
            out_of_time = rc is None and time.monotonic() > end
            if rc is None and not out_of_time:
                continue
            del running[module]
            relative = _relative(module)
            if out_of_time:
                _kill_group(process)
                timed_out.append(relative.name)
                note_running(rows_csv, "TIMEOUT", "the stage's time ran out here")
            elif rc not in (0, 1, 5):  # 5: nothing selected; other codes: pytest itself failed
                note_running(rows_csv, "CRASH", f"pytest exited {rc}")
                append_row(rows_csv, TEST_HEADERS, {"case": f"{relative} [pytest exit {rc}]",
                                                    "module": str(relative), "status": "error",
                                                    "error": f"pytest exited {rc}"})  # fmt: skip
            rows = read_rows(rows_csv)
            print(f"  {relative}: {'TIMEOUT' if out_of_time else f'exit {rc}'}, "
                  f"{sum(r['status'] == 'passed' for r in rows)} passed, "
                  f"{len(failed_rows(rows))} failed", flush=True)  # fmt: skip
        if running:
            time.sleep(0.2)
    _merge_rows([p for p in parts if p.exists()], check.out / "tests.csv")
    detail = f"{len(parts)} modules"
    if timed_out:
        return "TIMEOUT", f"{detail}; out of time in {', '.join(timed_out)}"
    return "ok", detail


def _resumable(
    check: Check, name: str, command: list[str], csv_path: Path, timeout: float, **env: str
) -> tuple[str, str]:
    """Runs a benchmark; after a crash in a case, notes that case and resumes from the next."""
    end = time.monotonic() + timeout
    for attempt in range(CRASH_RETRIES + 1):
        rc = check.run(
            name, command + (["--resume"] if attempt else []), end - time.monotonic(), **env
        )
        if rc is None:
            note_running(csv_path, "TIMEOUT", "the stage's time ran out here")
            return "TIMEOUT", "out of time"
        if rc in (0, 4):  # finished; 4: a check failed (its rows say which)
            return "ok", f"exit {rc}" + (f" after {attempt} crash(es)" if attempt else "")
        if not note_running(csv_path, "CRASH", f"the process died (exit {rc})"):
            break  # it died outside any case: a rerun would die the same way
        if end - time.monotonic() < 5:
            break
    return "CRASH", f"exit {rc} (see logs/{name}.log)"


def _lstm_scale(check: Check) -> list[str]:
    return (
        ["--device", "cpu", "--scale", "tiny"]
        if check.dry_run
        else ["--device", "cuda", "--scale", "gpu"]
    )


def stage_lstm(check: Check, timeout: float) -> tuple[str, str]:
    command = [check.python, str(BENCH / "lstm.py"), "--csv", str(check.out / "lstm.csv"),
               "--profile-csv", str(check.out / "lstm_profile.csv"),
               "--table", str(check.out / "lstm.txt")]  # fmt: skip
    command += _lstm_scale(check)
    return _resumable(check, "lstm", command, check.out / "lstm.csv", timeout)


def stage_lstm_tiles(check: Check, timeout: float) -> tuple[str, str]:
    """The LSTM shapes again on the candidate tiles of the persistent kernels
    (FASTPAR_LSTM_TILES=min-traffic), beside the default's rows, until a GPU run decides."""
    command = [check.python, str(BENCH / "lstm.py"), "--cell", "lstm", "--csv",
               str(check.out / "lstm_tiles.csv")]  # fmt: skip
    command += _lstm_scale(check)
    return _resumable(check, "lstm-tiles", command, check.out / "lstm_tiles.csv", timeout,
                      FASTPAR_LSTM_TILES="min-traffic")  # fmt: skip


def stage_allreduce(check: Check, timeout: float) -> tuple[str, str]:
    command = [check.python, str(BENCH / "allreduce.py"), "--csv",
               str(check.out / "allreduce.csv"), "--table", str(check.out / "allreduce.txt"),
               "--timeout", f"{timeout:.0f}"]  # fmt: skip
    command += ["--device", "cpu", "--scale", "tiny"] if check.dry_run else ["--device", "cuda"]
    return _resumable(check, "allreduce", command, check.out / "allreduce.csv", timeout)


def stage_sanitizer(check: Check, timeout: float) -> tuple[str, str]:
    csv_path = check.out / "sanitizer.csv"
    smoke = [check.python, str(BENCH / "kernel_smoke.py"), "--csv", str(csv_path)]
    sanitizer = find_cuda_tool("compute-sanitizer")
    if check.dry_run or sanitizer is None:
        # No sanitizer here: the same kernels run bare, so the stage's code is still exercised.
        why = "dry run" if check.dry_run else "compute-sanitizer not found"
        rc = check.run("sanitizer", [*smoke, "--device", "cpu" if check.dry_run else "cuda",
                                     "--tool", "none"], timeout)  # fmt: skip
        if rc is None:
            note_running(csv_path, "TIMEOUT", "the stage's time ran out here")
        status = "TIMEOUT" if rc is None else ("ok" if rc in (0, 4) else "CRASH")
        return status, f"kernels run without a sanitizer ({why})"
    end = time.monotonic() + timeout
    verdicts = []
    for index, tool in enumerate(SANITIZER_TOOLS):
        # The first tool also compiles the kernels (then in Triton's cache): twice the share.
        shares = [2.0 if i == 0 else 1.0 for i in range(index, len(SANITIZER_TOOLS))]
        left = (end - time.monotonic()) * shares[0] / sum(shares)
        log = check.logs / f"sanitizer-{tool}.txt"
        command = [
            sanitizer,
            "--tool",
            tool,
            "--target-processes",
            "all",
            "--log-file",
            str(log),
            "--print-limit",
            "20",
            *smoke,
            "--device",
            "cuda",
            "--tool",
            tool,
        ]
        # Without the caching allocator every tensor is its own allocation, so an access past a
        # tensor's end is past an allocation's end, which memcheck sees.
        rc = check.run(f"sanitizer-{tool}", command, left, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
        if rc is None:
            note_running(csv_path, "TIMEOUT", f"{tool}: the stage's time ran out here")
        text = log.read_text(errors="replace") if log.exists() else ""
        counts = [int(n) for n in re.findall(r"ERROR SUMMARY: (\d+) error", text)]
        errors = sum(counts)
        status = "TIMEOUT" if rc is None else ("ok" if errors == 0 and rc in (0, 4) else "FAIL")
        first = next(
            (
                line
                for line in text.splitlines()
                if "=========" in line
                and ("Invalid" in line or "Race" in line or "error" in line.lower())
            ),
            "",
        )
        append_row(csv_path, SMOKE_HEADERS, {
            "case": f"{tool} | compute-sanitizer verdict", "tool": tool, "status": status,
            "error": f"{errors} error(s), exit {rc}; {first.strip()[:200]}" if status != "ok"
            else "",
        })  # fmt: skip
        verdicts.append(f"{tool} {errors} errors" if rc is not None else f"{tool} timeout")
    return ("ok" if all("timeout" not in v for v in verdicts) else "TIMEOUT"), "; ".join(verdicts)


STAGES: dict[str, tuple[Callable[[Check, float], tuple[str, str]], str | None]] = {
    # stage: (function, the rows it writes)
    "versions": (stage_versions, "versions.txt"),
    "build": (stage_build, None),
    "tests": (stage_tests, "tests.csv"),
    "lstm": (stage_lstm, "lstm.csv"),
    "lstm-tiles": (stage_lstm_tiles, "lstm_tiles.csv"),
    "allreduce": (stage_allreduce, "allreduce.csv"),
    "sanitizer": (stage_sanitizer, "sanitizer.csv"),
}


def _status(rc: int | None) -> str:
    return "TIMEOUT" if rc is None else f"exit {rc}"


def run_stages(check: Check, names: list[str]) -> None:
    check.deadline = time.monotonic() + sum(BUDGETS[s] for s in names)
    for name in names:
        function, rows_file = STAGES[name]
        if name == "build" and "lstm" in names:
            check.start_warming()
        if name in ("lstm", "lstm-tiles", "allreduce", "sanitizer"):
            check.stop_warming()
        timeout = check.budget(name, names)
        print(f"\n===== stage {name} (budget {timeout:.0f} s) =====", flush=True)
        start = time.monotonic()
        try:
            status, detail = function(check, timeout)
        except Exception as error:  # a bug here must not cost the stages after it
            status, detail = "CRASH", f"{type(error).__name__}: {error}"
        seconds = time.monotonic() - start
        rows = failed = 0
        if rows_file is not None:
            path = check.out / rows_file
            if path.suffix == ".csv":
                table = read_rows(path)
                rows, failed = len(table), len(failed_rows(table))
            else:
                rows = len(path.read_text().splitlines()) if path.exists() else 0
        if check.dry_run and rows_file is not None and rows == 0 and status == "ok":
            status, detail = "NO ROWS", f"{rows_file} has no rows; {detail}"
        row = {
            "stage": name,
            "status": status,
            "seconds": f"{seconds:.0f}",
            "budget_s": f"{timeout:.0f}",
            "rows": rows,
            "failed": failed,
            "detail": detail,
        }
        check.stage_rows.append(row)
        append_row(check.out / "stages.csv", STAGE_HEADERS, row)
    check.stop_warming()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def exit_status(check: Check) -> int:
    statuses = [str(r["status"]) for r in check.stage_rows]
    if any(int(r["failed"]) for r in check.stage_rows) or any(
        s in ("FAIL", "CRASH", "NO ROWS") for s in statuses
    ):
        return 1
    return 3 if "TIMEOUT" in statuses else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="the same stages on a CPU: tiny shapes, Triton's interpreter",
    )
    parser.add_argument("--python", default=sys.executable, help="the Python that runs stages")
    parser.add_argument("--only", nargs="+", choices=list(STAGES), default=list(STAGES))
    parser.add_argument(
        "--bundle",
        type=Path,
        help="also write the whole results folder (rows, logs, junit) to this .tar.gz, for a "
        "machine that hands back only a few files",
    )
    args = parser.parse_args(argv)
    out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    out.mkdir(parents=True, exist_ok=True)
    # Rows of an earlier run would read as this run's.
    for old in (*out.glob("*.csv"), *out.glob("*.running"), *out.glob("*.txt")):
        old.unlink()
    shutil.rmtree(out / "logs", ignore_errors=True)
    shutil.rmtree(out / "junit", ignore_errors=True)
    check = Check(out=out, dry_run=args.dry_run, python=args.python)
    start = time.monotonic()
    # Stopped from outside (Ctrl-C, or SIGTERM from a wrapper's time limit): end the stage's
    # processes, then still print what the rows say.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        run_stages(check, args.only)
    except KeyboardInterrupt:
        for process in (check.current, check.warming, *check.side_by_side):
            if process is not None and process.poll() is None:
                _kill_group(process)
        check.stage_rows.append({"stage": "(interrupted)", "status": "TIMEOUT", "failed": 0})
        append_row(out / "stages.csv", STAGE_HEADERS,
                   {"stage": "(interrupted)", "status": "TIMEOUT",
                    "detail": "the check was stopped from outside"})  # fmt: skip
    from gpu_summary import summary

    text = summary(out, dry_run=args.dry_run)
    print("\n" + text, flush=True)
    status = exit_status(check)
    (out / "summary.txt").write_text(text + "\n")
    if args.bundle is not None:
        bundle_path = args.bundle.resolve()
        with tarfile.open(bundle_path, "w:gz") as bundle:  # (never itself, if inside `out`)
            bundle.add(
                out,
                arcname="gpu_check",
                filter=lambda m: None if m.name.endswith(bundle_path.name) else m,
            )
    print(f"\ngpu_check: {time.monotonic() - start:.0f} s, exit {status} "
          f"({['all checks passed', 'a check failed', '', 'a stage ran out of time'][status]}); "
          f"rows and logs in {out}", flush=True)  # fmt: skip
    return status


if __name__ == "__main__":
    sys.exit(main())
