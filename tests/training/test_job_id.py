"""How a torchrun job of `fastpar train` knows itself across restarts (`cli.job_id`), in each of
torchrun's launch modes, faked as its workers see them: the run id in TORCHELASTIC_RUN_ID and
the store its agents serve to every attempt (torch/distributed/run.py,
elastic/rendezvous/static_tcp_rendezvous.py and dynamic_rendezvous.py)."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from fastpar.training import checkpoint
from fastpar.training.batches import Batches
from fastpar.training.cli import job_id, prepare, run
from fastpar.training.config import TrainConfig
from fastpar.training.loop import build_stage
from fastpar.training.parallel_dims import RankPlace
from fastpar.training.state import save_checkpoint


@dataclasses.dataclass(frozen=True)
class Launch:
    """One torchrun job as its rank 0 sees it in every attempt."""

    run_id: str  # TORCHELASTIC_RUN_ID, which the agents keep for the whole job
    store_moves: bool = False  # a fresh store on each restart: c10d's rank 0 on another host
    agent_store: bool = True  # False: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, rank 0 hosts one

    def ids(self, monkeypatch: pytest.MonkeyPatch, attempts: int = 3) -> list[str | None]:
        """`job_id` of each attempt; every restart's reason not to know itself must be None."""
        ids, reasons = self.attempts(monkeypatch, attempts)
        assert reasons == [None] * attempts
        return ids

    def attempts(
        self, monkeypatch: pytest.MonkeyPatch, attempts: int = 3
    ) -> tuple[list[str | None], list[str | None]]:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", self.run_id)
        store = dist.HashStore()
        answers = []
        for restarts in range(attempts):
            if self.store_moves and restarts:
                store = dist.HashStore()
            answers.append(job_id(store if self.agent_store else None, restarts))
        return [job for job, _ in answers], [reason for _, reason in answers]


def _torchrun_uuid() -> str:
    return str(uuid.uuid4())  # as torchrun draws it for --standalone and one host


# Each mode as torchrun sets it up; a call is a new job.
MODES = {
    "standalone": lambda: Launch(run_id=_torchrun_uuid()),
    "one host, c10d without --rdzv-endpoint": lambda: Launch(run_id=_torchrun_uuid()),
    "static": lambda: Launch(run_id="none"),
    "static --rdzv-id": lambda: Launch(run_id=f"job-{uuid.uuid4().hex[:6]}"),
    "c10d": lambda: Launch(run_id="none"),
    "c10d --rdzv-id": lambda: Launch(run_id=f"job-{uuid.uuid4().hex[:6]}"),
    "c10d --rdzv-id, rank 0 moved": lambda: Launch(
        run_id=f"job-{uuid.uuid4().hex[:6]}", store_moves=True
    ),
    "standalone, rank 0 hosts the store": lambda: Launch(
        run_id=_torchrun_uuid(), agent_store=False
    ),
}


@pytest.mark.parametrize("mode", MODES)
def test_every_attempt_of_a_job_has_its_id_and_another_job_another(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restarted attempt resumes only from checkpoints its job recorded: it must find the
    first attempt's id, and a job whose first attempt was refused must not find an earlier
    job's. A c10d rendezvous can give a restart a fresh store (its rank 0 on another host): the
    run id it keeps is taken before the store's id."""
    first, second = MODES[mode](), MODES[mode]()
    ids = first.ids(monkeypatch)
    assert ids[0] is not None and ids == [ids[0]] * len(ids)
    assert second.ids(monkeypatch)[0] not in ids


def test_jobs_of_one_rdzv_id_share_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun takes --rdzv-id as the job: its rendezvous joins two jobs given the same one."""
    assert Launch(run_id="lstm").ids(monkeypatch)[0] == Launch(run_id="lstm").ids(monkeypatch)[0]


def test_a_restart_that_cannot_know_its_job_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a --rdzv-id, only the store tells jobs apart, and a restart whose store is not the
    first attempt's finds another id; without a store the job has none."""
    ids, reasons = Launch(run_id="none", store_moves=True).attempts(monkeypatch)
    assert len(set(ids)) == 3 and reasons[0] is None
    assert reasons[1:] == ["no --rdzv-id names the job and torchrun's store is newer than the "
                           "first attempt (its host moved)"] * 2  # fmt: skip
    ids, reasons = Launch(run_id="none", agent_store=False).attempts(monkeypatch)
    assert ids == [None] * 3 and reasons[0] is None
    assert reasons[1:] == ["no --rdzv-id names the job and torchrun's store did not outlive the "
                           "first attempt"] * 2  # fmt: skip


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process, as meant
def test_a_restart_on_a_fresh_store_resumes_its_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A one-rank torchrun job with a --rdzv-id, in this process: its first attempt was let in
    and saved step 1; the restart, served a fresh store as after c10d moved rank 0, continues
    from it (it refused the folder as another run's)."""
    config = TrainConfig(embed=4, hidden=8, layers=1, seq_len=8, batch_size=2, train_bytes=4_000,
                         validation_bytes=1_000, validation_batches=1, sample_bytes=4, steps=2,
                         checkpoint_dir=tmp_path)  # fmt: skip
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    first_store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
    job, _ = job_id(first_store, 0)
    assert prepare(config, job=job) is None
    place = RankPlace(dims=config.layout(1), rank=0, replica=0, stage=0, dp_group=None,
                      pp_group=None)  # fmt: skip
    stage = build_stage(config, place, torch.device("cpu"))
    save_checkpoint(config, 1, place, stage.module, stage.optimizer, Batches(config, place, 64))

    fresh_store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
    torchrun = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(fresh_store.port), "TORCHELASTIC_USE_AGENT_STORE": "True",
                "TORCHELASTIC_RESTART_COUNT": "1"}  # fmt: skip
    for name, value in torchrun.items():
        monkeypatch.setenv(name, value)
    assert run(config) == 0, capsys.readouterr().err
    assert "resumed from step 1" in capsys.readouterr().out
    assert checkpoint.recorded_job(tmp_path) == job
