"""A torchrun job restarted without a count: after a membership change (a node joined a
healthy group) torchrun starts the workers anew and TORCHELASTIC_RESTART_COUNT stays
(torch/distributed/elastic/agent/server/api.py, `_invoke_run`). Each attempt is a one-rank
`fastpar train` run in this process, with torchrun's environment set as its worker sees it; the
first dies after its checkpoint of step 1, as a worker the agent stops."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

from fastpar.training import checkpoint, loop
from fastpar.training.cli import run
from fastpar.training.config import TrainConfig

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


class _Stopped(BaseException):
    """The agent stopped the worker (a node joined)."""


def _config(root: Path, **options: object) -> TrainConfig:
    return TrainConfig(embed=4, hidden=8, layers=1, seq_len=8, batch_size=2, train_bytes=4_000,
                       validation_bytes=1_000, validation_batches=1, sample_bytes=4, steps=2,
                       checkpoint_every=1, checkpoint_dir=root, timeout_s=30,
                       **options)  # type: ignore[arg-type]  # fmt: skip


def _as_torchrun_worker(monkeypatch: pytest.MonkeyPatch, store: dist.TCPStore,
                        run_id: str) -> None:  # fmt: skip
    """Rank 0 of 1, served `store` by its agent; the count is 0 in every attempt."""
    worker = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(store.port), "TORCHELASTIC_USE_AGENT_STORE": "True",
              "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_RUN_ID": run_id}  # fmt: skip
    for name, value in worker.items():
        monkeypatch.setenv(name, value)


def _first_attempt_stopped_after_step_1(
    monkeypatch: pytest.MonkeyPatch, config: TrainConfig, store: dist.TCPStore, run_id: str
) -> None:
    def stop_at_step_1(rank: int, step: int) -> None:
        if step == 1:
            raise _Stopped

    _as_torchrun_worker(monkeypatch, store, run_id)
    with monkeypatch.context() as patch:
        patch.setattr(loop, "maybe_die", stop_at_step_1)
        with pytest.raises(_Stopped):
            run(config)
    assert checkpoint.list_steps(config.checkpoint_dir) == [1]


def _group_prefixes(monkeypatch: pytest.MonkeyPatch, server: dist.TCPStore) -> list[str]:
    """Where each process group formed from now on keeps its keys in `server`: a key written
    through the store handed to `init_process_group`, found among the server's keys."""
    prefixes: list[str] = []
    init = dist.init_process_group

    def init_and_probe(*args: object, store: dist.Store, **kwargs: object) -> None:
        probe = f"probe{len(prefixes)}"
        before = set(server.list_keys())
        store.set(probe, "")
        store.get(probe)  # a set is not answered: this one is done once the get is
        (key,) = set(server.list_keys()) - before
        prefixes.append(key.removesuffix(probe))
        init(*args, store=store, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(dist, "init_process_group", init_and_probe)
    return prefixes


@pytest.mark.parametrize("run_id", ["none", "job-7"])
def test_an_uncounted_restart_forms_its_group_apart_from_the_dead_attempt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_id: str
) -> None:
    """The restart must not form its group under the keys the dead attempt left in the same
    store (gloo would read the dead ranks' addresses)."""
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
    prefixes = _group_prefixes(monkeypatch, store)
    config = _config(tmp_path)
    _first_attempt_stopped_after_step_1(monkeypatch, config, store, run_id)
    run(config)  # whether it goes on is the next test's
    assert len(prefixes) == 2 and prefixes[0] != prefixes[1], prefixes


@pytest.mark.parametrize("run_id", ["none", "job-7"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_an_uncounted_restart_resumes_its_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    run_id: str, overwrite: bool,
) -> None:  # fmt: skip
    """The restart, on the store of the dead attempt, continues from its checkpoint: it neither
    refuses the folder as another run's nor, given --overwrite, deletes the job's checkpoints."""
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
    config = _config(tmp_path, overwrite=overwrite)
    _first_attempt_stopped_after_step_1(monkeypatch, config, store, run_id)
    capsys.readouterr()
    assert run(config) == 0, capsys.readouterr().err
    out, err = capsys.readouterr()
    assert "resumed from step 1" in out
    assert "torchrun restarted it without counting a failure" in err
    assert checkpoint.list_steps(tmp_path) == [1, 2]


def test_overwrite_keeps_the_jobs_checkpoints_where_an_attempt_cannot_tell_it_is_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An uncounted restart served a new store (c10d moved rank 0 to the node that joined):
    nothing tells it from a new launch of the job (the same --rdzv-id). --overwrite must not
    delete what may be the job's own checkpoints: it refuses, and torchrun counts a failure,
    whose restart continues."""
    config = _config(tmp_path, overwrite=True)
    first_store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
    _first_attempt_stopped_after_step_1(monkeypatch, config, first_store, "job-7")
    new_store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
    _as_torchrun_worker(monkeypatch, new_store, "job-7")
    capsys.readouterr()
    assert run(config) == 1
    assert "holds checkpoints of torchrun job 'rdzv-id job-7', which this is" in (
        capsys.readouterr().err
    )
    assert checkpoint.list_steps(tmp_path) == [1]
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert run(config) == 0
    assert "resumed from step 1" in capsys.readouterr().out
