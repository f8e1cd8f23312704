"""`fastpar train` with its default options on two simulated hosts: torchrun --nnodes 2 on
127.0.0.1, the second node in its own IPC namespace (`unshare --ipc`), so that its ranks cannot
share memory with the first node's. Data parallelism takes the hierarchical all-reduce (2 x 2),
pipelines cross the hosts over torch.distributed links, and dp+pp's replica groups (one rank per
host) take torch.distributed."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.processes import children

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


JOB_LIMIT_S = 240.0  # for the whole two-node job
# How long a node may outlive its peer's failure: a node whose ranks succeeded would otherwise
# wait 300 s in torchrun's exit barrier for the failed one (DistStoreError on
# terminal_state/last_member), and the failure would read as a timeout.
PEER_FAILURE_GRACE_S = 5.0


def _stop(node: subprocess.Popen[str]) -> None:
    """Stop a torchrun agent and its ranks: SIGTERM, on which the agent stops its ranks (unless
    it is blocked in a wait, as in its exit barrier), then SIGKILL for the agent and any of its
    ranks left (each rank leads a session of its own, which the agent's end does not reach)."""
    ranks = [pid for pid, _ in children(node.pid)]
    node.terminate()
    try:
        node.wait(timeout=5)
    except subprocess.TimeoutExpired:
        node.kill()
        node.wait()
    for rank in ranks:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(rank, signal.SIGKILL)


def _wait_for_both(nodes: list[subprocess.Popen[str]]) -> str:
    """Wait for both nodes to end; the first one to fail ends the other after
    PEER_FAILURE_GRACE_S. Returns what went wrong ("" when both exited with 0)."""
    start = time.monotonic()
    end = start + JOB_LIMIT_S
    problems: list[str] = []
    while time.monotonic() < end:
        codes = [node.poll() for node in nodes]  # every node's, each time
        if None not in codes:
            break
        failed = [n for n, code in enumerate(codes) if code not in (None, 0)]
        if failed and not problems:
            took = time.monotonic() - start
            problems.append(f"node {failed[0]} exited with code {nodes[failed[0]].returncode} "
                            f"after {took:.0f} s")  # fmt: skip
            end = min(end, time.monotonic() + PEER_FAILURE_GRACE_S)
        time.sleep(0.2)
    if not problems and any(node.poll() is None for node in nodes):
        problems.append(f"the job did not end within {JOB_LIMIT_S:.0f} s")
    for n, node in enumerate(nodes):
        if node.poll() is None:
            _stop(node)
            problems.append(f"node {n} was stopped after {time.monotonic() - start:.0f} s")
        elif node.returncode != 0 and not any(p.startswith(f"node {n} ") for p in problems):
            problems.append(f"node {n} exited with code {node.returncode}")
    return "; ".join(problems)


def _two_hosts(tmp: Path, *args: str, node1_env: dict[str, str] | None = None
               ) -> list[subprocess.CompletedProcess[str]]:  # fmt: skip
    """Node 0 and node 1 (in its own IPC namespace) of one torchrun job, 2 ranks each, with
    `node1_env` added to node 1's environment. Fails the test, with both nodes' stderr, unless
    both exit with 0."""
    port = _free_port()
    nodes, outputs = [], [(tmp / f"node{n}.stdout", tmp / f"node{n}.stderr") for n in (0, 1)]
    for node in (0, 1):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                   "--nproc-per-node", "2", "--node-rank", str(node), "--master-addr",
                   "127.0.0.1", "--master-port", str(port), "-m", "fastpar", "train", *SMALL,
                   "--checkpoint-dir", str(tmp / "checkpoints"), "--steps", "2",
                   "--checkpoint-every", "2", *args]  # fmt: skip
        env = dict(os.environ)
        if node == 1:
            command = ["unshare", "--ipc", *command]
            env.update(node1_env or {})
        # Files, not pipes: nothing reads the nodes' output while they run.
        stdout, stderr = outputs[node]
        with open(stdout, "w") as out, open(stderr, "w") as err:
            nodes.append(subprocess.Popen(command, cwd=REPO, env=env, text=True, stdout=out,
                                          stderr=err))  # fmt: skip
    try:
        problem = _wait_for_both(nodes)
    finally:
        for node in nodes:
            if node.poll() is None:
                _stop(node)
    said = [(stdout.read_text(), stderr.read_text()) for stdout, stderr in outputs]
    if problem:
        pytest.fail(problem + "".join(f"\n--- node {n} stderr:\n{err[-3000:]}"
                                      for n, (_, err) in enumerate(said)))  # fmt: skip
    return [subprocess.CompletedProcess(node.args, 0, out, err)
            for node, (out, err) in zip(nodes, said, strict=True)]  # fmt: skip


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
    assert "validation loss:" in first.stdout, first.stdout[-2000:]
    if choice is not None:  # said once, by rank 0
        assert first.stderr.count(choice) == 1, first.stderr[-3000:]
        assert choice not in second.stderr


def test_a_failed_node_fails_the_job_at_once(tmp_path: Path) -> None:
    """Node 1's ranks train but exit with code 3: its agent fails at once, and node 0's, whose
    ranks succeeded, is stopped after the grace instead of waiting out its exit barrier."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import atexit, os\n"
        "if 'LOCAL_RANK' in os.environ:  # torchrun's ranks, not its agent\n"
        "    atexit.register(lambda: os._exit(3))\n"
    )
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as failure:
        _two_hosts(tmp_path, "--parallel", "pp", "--microbatches", "2",
                   node1_env={"PYTHONPATH": path})  # fmt: skip
    took = time.monotonic() - start
    message = str(failure.value)
    assert message.startswith("node 1 exited with code 1"), message[:3000]
    assert "node 0 was stopped" in message, message[:3000]
    assert "exitcode  : 3" in message, message[-3000:]  # node 1's report of its ranks
    # Far below torchrun's 300 s exit barrier (and JOB_LIMIT_S): about 20 s here.
    assert took < JOB_LIMIT_S / 2, f"{took:.0f} s\n{message[:3000]}"
