"""A checkpoint written by one layout resumes on another: dp=2 -> dp=1, dp=3, pp=2, dp+pp=4, and
dp+pp=4 -> dp=2. Each rank checks that what it restored equals what was saved (its stage's
parameters and optimizer state, the data position), then trains on from the same step. On the
layout that wrote it, each rank continues its own RNG streams."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from fastpar.testing.distributed import run_multiprocess
from fastpar.training import checkpoint
from fastpar.training.batches import Batches
from fastpar.training.checkpoint import Found, find_intact
from fastpar.training.config import TrainConfig
from fastpar.training.corpus import load_corpus, num_windows
from fastpar.training.loop import Stage, build_stage, run_steps
from fastpar.training.parallel_dims import RankPlace
from fastpar.training.state import restore, save_checkpoint, seed_rank_streams

CONFIG = TrainConfig(embed=8, hidden=16, layers=2, seq_len=16, batch_size=4, train_bytes=40_000,
                     validation_bytes=4_000, log_every=100, lr=0.01, comm="torch",
                     timeout_s=60, checkpoint_every=100)  # fmt: skip


def _resume_check_and_train(
    rank: int, world_size: int, config: TrainConfig, found: Found
) -> dict[str, Any]:
    place = config.layout(world_size).build(rank, config.timeout_s)
    corpus = load_corpus(config.train_bytes, config.validation_bytes)
    stage = build_stage(config, place, torch.device("cpu"))
    batches = Batches(config, place, num_windows(corpus.train, config.seq_len))
    step = restore(config, found, place, stage.module, stage.optimizer, batches)
    saved = checkpoint.read_tensors(found.directory)
    names = []
    for name, parameter in stage.module.named_parameters():
        names.append(name)
        assert torch.equal(parameter.detach(), saved[f"model.{name}"]), name
        state = stage.optimizer.state[parameter]
        assert state.keys() == {"step", "exp_avg", "exp_avg_sq"}, name
        for key, value in state.items():
            assert torch.equal(value, saved[f"optimizer.state.{name}.{key}"]), (name, key)
    assert batches.state_dict() == found.manifest["data"]
    before = [p.detach().clone() for p in stage.module.parameters()]
    dist.barrier()
    run_steps(config, place, stage, batches, corpus, step)
    for dp in stage.dps:
        dp.close()
    moved = any(
        not torch.equal(a, p) for a, p in zip(before, stage.module.parameters(), strict=True)
    )
    return {"step": step, "names": names, "moved": moved}


def _resume(source: Path, target: Path, world_size: int, **options: Any) -> list[dict[str, Any]]:
    found, notes = find_intact(source)
    assert found is not None and not notes
    target.mkdir()
    config = dataclasses.replace(CONFIG, checkpoint_dir=target, steps=found.step + 1, **options)
    results = run_multiprocess(_resume_check_and_train, world_size, args=(config, found),
                               timeout=180)  # fmt: skip
    assert all(r["step"] == found.step and r["moved"] for r in results)
    # Every parameter of the model was restored on some rank, and the run went on.
    saved_names = {k.removeprefix("model.") for k in checkpoint.read_tensors(found.directory)
                   if k.startswith("model.")}  # fmt: skip
    assert {name for r in results for name in r["names"]} == saved_names
    written, _ = find_intact(target)
    assert written is not None and written.step == found.step + 1
    assert written.manifest["written_by"]["world_size"] == world_size
    return results


def _train_from_scratch(rank: int, world_size: int, config: TrainConfig) -> None:
    place = config.layout(world_size).build(rank, config.timeout_s)
    corpus = load_corpus(config.train_bytes, config.validation_bytes)
    stage = build_stage(config, place, torch.device("cpu"))
    batches = Batches(config, place, num_windows(corpus.train, config.seq_len))
    run_steps(config, place, stage, batches, corpus, 0)
    for dp in stage.dps:
        dp.close()


@pytest.fixture(scope="module")
def dp2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dp2") / "checkpoints"
    root.mkdir()
    config = dataclasses.replace(CONFIG, checkpoint_dir=root, steps=2)
    run_multiprocess(_train_from_scratch, 2, args=(config,), timeout=180)
    return root


@pytest.mark.parametrize(
    ("world_size", "options"),
    [
        (1, {"parallel": "dp"}),
        (3, {"parallel": "dp"}),
        (2, {"parallel": "pp"}),
        (4, {"parallel": "dp+pp", "pp_stages": 2}),
    ],
    ids=["dp1", "dp3", "pp2", "dp+pp4"],
)
def test_dp2_checkpoint_resumes_on_another_layout(
    dp2_checkpoint: Path, tmp_path: Path, world_size: int, options: dict[str, Any]
) -> None:
    results = _resume(dp2_checkpoint, tmp_path / "resumed", world_size, **options)
    if options["parallel"] == "dp+pp":
        # And back: the checkpoint dp+pp wrote (at step 3) resumes on dp=2.
        assert len(results) == 4
        _resume(tmp_path / "resumed", tmp_path / "back", 2, parallel="dp")


def _streams() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def _same_streams(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return torch.equal(a["torch"], b["torch"]) and a["python"] == b["python"]


def _seeded_rank(
    rank: int, world_size: int, config: TrainConfig
) -> tuple[RankPlace, Stage, Batches]:
    """A rank as `fastpar train` starts it: streams seeded from --seed and the rank, whatever
    they were (unpredictable in a new process; forked ranks inherit the server's)."""
    place = config.layout(world_size).build(rank, config.timeout_s)
    torch.seed()
    random.seed()
    seed_rank_streams(config.seed, rank)
    corpus = load_corpus(config.train_bytes, config.validation_bytes)
    stage = build_stage(config, place, torch.device("cpu"))
    return place, stage, Batches(config, place, num_windows(corpus.train, config.seq_len))


def _save_after_drawing(rank: int, world_size: int, config: TrainConfig) -> dict[str, Any]:
    """Draws a rank-dependent amount (as a model with dropout would) and saves; returns the
    streams the checkpoint holds."""
    place, stage, batches = _seeded_rank(rank, world_size, config)
    torch.rand(rank + 1)
    for _ in range(rank + 1):
        random.random()
    saved = _streams()
    save_checkpoint(config, 2, place, stage.module, stage.optimizer, batches)
    assert _same_streams(_streams(), saved)  # saving draws nothing
    return saved


def _streams_after_restore(
    rank: int, world_size: int, config: TrainConfig, found: Found
) -> dict[str, Any]:
    place, stage, batches = _seeded_rank(rank, world_size, config)
    torch.rand(7)  # whatever the streams were before, the restore sets them
    restore(config, found, place, stage.module, stage.optimizer, batches)
    return _streams()


def test_each_rank_resumes_its_own_rng_streams(tmp_path: Path) -> None:
    saved_by_run = []
    for run in ("first", "again"):
        root = tmp_path / run
        root.mkdir()
        config = dataclasses.replace(CONFIG, checkpoint_dir=root)
        saved_by_run.append(run_multiprocess(_save_after_drawing, 2, args=(config,), timeout=180))
    first, again = saved_by_run
    # Every rank draws its own numbers, and the same options draw the same ones in every run.
    assert not torch.equal(first[0]["torch"], first[1]["torch"])
    assert first[0]["python"] != first[1]["python"]
    for mine, repeated in zip(first, again, strict=True):
        assert _same_streams(mine, repeated)
    found, _ = find_intact(tmp_path / "first")
    assert found is not None
    again_found, _ = find_intact(tmp_path / "again")
    assert again_found is not None and found.manifest["rng"] == again_found.manifest["rng"]

    config = dataclasses.replace(CONFIG, checkpoint_dir=tmp_path / "first")
    same_layout = run_multiprocess(_streams_after_restore, 2, args=(config, found), timeout=180)
    for mine, restored in zip(first, same_layout, strict=True):
        assert _same_streams(mine, restored)
    # On another layout no stream continues another rank's: each is seeded anew from --seed, the
    # rank and the step, the same in every resume.
    other_layouts = [run_multiprocess(_streams_after_restore, 3, args=(config, found), timeout=180)
                     for _ in range(2)]  # fmt: skip
    for once, twice in zip(*other_layouts, strict=True):
        assert _same_streams(once, twice)
        assert all(not torch.equal(once["torch"], mine["torch"]) for mine in first)
