"""`fastpar train` with its default options on two simulated hosts: torchrun --nnodes 2 on
127.0.0.1, the second node in its own IPC namespace (`unshare --ipc`), so that its ranks cannot
share memory with the first node's. Data parallelism takes the hierarchical all-reduce (2 x 2),
pipelines cross the hosts over torch.distributed links, and dp+pp's replica groups (one rank per
host) take torch.distributed."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .util import REPO, SMALL


def _unshare_problem() -> str:
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe = subprocess.run(["unshare", "--ipc", "true"], capture_output=True, text=True,
                           check=False)  # fmt: skip
    if probe.returncode != 0:
        return f"this sandbox forbids new IPC namespaces: {probe.stderr.strip()}"
    return ""


pytestmark = pytest.mark.skipif(bool(_unshare_problem()), reason=_unshare_problem() or "-")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stderr_of_killed(node: subprocess.Popen[str]) -> str:
    """What a killed torchrun wrote to stderr (its ranks may hold the pipe a while longer)."""
    try:
        return node.communicate(timeout=30)[1]
    except subprocess.TimeoutExpired as held:
        text = held.stderr or ""
        return text.decode(errors="replace") if isinstance(text, bytes) else text


def _two_hosts(tmp: Path, *args: str) -> list[subprocess.CompletedProcess[str]]:
    """Node 0 and node 1 (in its own IPC namespace) of one torchrun job, 2 ranks each."""
    port = _free_port()
    nodes = []
    for node in (0, 1):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                   "--nproc-per-node", "2", "--node-rank", str(node), "--master-addr",
                   "127.0.0.1", "--master-port", str(port), "-m", "fastpar", "train", *SMALL,
                   "--checkpoint-dir", str(tmp), "--steps", "2", "--checkpoint-every", "2",
                   *args]  # fmt: skip
        if node == 1:
            command = ["unshare", "--ipc", *command]
        nodes.append(subprocess.Popen(command, cwd=REPO, env=dict(os.environ), text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))  # fmt: skip
    results = []
    for node in nodes:
        try:
            stdout, stderr = node.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            # What each node said is the only clue to why the job did not end (torchrun's
            # agents wait up to 300 s at exit for a node whose ranks failed).
            for other in nodes:
                other.kill()
            unread = nodes[len(results) :]
            said = [r.stderr for r in results] + [_stderr_of_killed(n) for n in unread]
            pytest.fail(
                "the job did not end within 240 s\n"
                + "\n".join(f"--- node {n} stderr:\n{text[-3000:]}" for n, text in enumerate(said))
            )
        results.append(subprocess.CompletedProcess(node.args, node.returncode, stdout, stderr))
    return results


@pytest.mark.parametrize(
    ("layout", "args", "choice"),
    [
        ("dp", (), "fastpar all-reduce: hierarchical (4 ranks on 2 hosts ([0, 1], [2, 3])"),
        ("pp", ("--parallel", "pp", "--microbatches", "2"), None),
        (
            "dp+pp",
            ("--parallel", "dp+pp", "--microbatches", "2"),
            "fastpar all-reduce: torch (2 ranks on 2 hosts ([0], [1]): each host holds one rank",
        ),
    ],
    ids=["dp", "pp", "dp+pp"],
)
def test_default_options_train_across_two_hosts(
    tmp_path: Path, layout: str, args: tuple[str, ...], choice: str | None
) -> None:
    first, second = _two_hosts(tmp_path, *args)
    for node in (first, second):
        assert node.returncode == 0, f"{layout}:\n{node.stderr[-3000:]}"
    assert "validation loss:" in first.stdout, first.stdout[-2000:]
    if choice is not None:  # said once, by rank 0
        assert first.stderr.count(choice) == 1, first.stderr[-3000:]
        assert choice not in second.stderr
