"""Options of `fastpar train`, validated once, before any process starts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

from fastpar._checks import check_bool, check_choice, check_int, check_positive, check_timeout_s
from fastpar._schedule_names import CHUNKED_SCHEDULES
from fastpar._schedule_names import Schedule as ScheduleName

if TYPE_CHECKING:  # the command line parses options without importing torch
    from fastpar.training.parallel_dims import ParallelDims

ParallelMode = Literal["dp", "pp", "dp+pp"]
SlicingMode = Literal["fixed", "throughput", "loss"]
CommName = Literal["auto", "ring", "torch"]
# fastpar.nn.LSTM's backends, spelled out so the CLI parses options without importing torch.
BackendName = Literal["auto", "triton", "torch", "reference"]
CellName = Literal["lstm", "gru", "rnn"]
BalanceName = Literal["even", "auto"]
MAX_SEED = 2**32 - 1


@dataclass(kw_only=True, frozen=True)
class TrainConfig:
    """Everything a training run needs; the same on every rank."""

    nproc: int = 2
    """Processes to start on this machine (ignored under torchrun, which starts them)."""
    parallel: ParallelMode = "dp"
    """dp: replicas; pp: one pipeline stage per rank; dp+pp: pipelines of `pp_stages` stages,
    replicated (ranks = replicas x stages)."""
    pp_stages: int = 2
    """Stages per pipeline with dp+pp (with pp every rank is a stage)."""
    microbatches: int = 4
    """Micro-batches per pipeline step."""
    schedule: ScheduleName = "1f1b"
    """Pipeline schedule."""
    balance: BalanceName = "even"
    """How the model is cut into pipeline stages. even: the same number of modules per stage;
    auto: rank 0 times each module's forward and backward on a micro-batch and every rank takes
    the cuts where the slowest stage is fastest (`split_sequential(balance="auto")`)."""
    comm: CommName = "auto"
    """Gradient all-reduce. auto: fastpar's shared-memory (CPU) or CUDA-IPC (GPU) ring when every
    rank of a data-parallel group shares a host, the hierarchical all-reduce when several hosts
    hold the same number (>= 2) of its ranks, torch.distributed otherwise (the choice and its
    reason logged on rank 0); ring: fastpar's all-reduce or an error naming why it cannot
    serve; torch: torch.distributed (gloo on CPU, NCCL on GPU)."""
    backend: BackendName = "auto"
    """LSTM backend."""
    cell: CellName = "lstm"
    """Recurrent cell of every layer: LSTM, GRU or Elman RNN (tanh)."""
    embed: int = 48
    hidden: int = 128
    layers: int = 2
    seq_len: int = 48
    batch_size: int = 16
    """Samples (windows of seq_len bytes) per step and replica: the global batch is
    batch_size x replicas (dynamic slicing moves it between ranks)."""
    steps: int = 1500
    """Optimizer steps in the whole run (a resumed run continues up to this)."""
    lr: float = 4e-3
    slicing: SlicingMode = "fixed"
    """fixed: equal blocks; throughput: blocks follow each replica's speed; loss: blocks grow
    while the loss is stable and shrink when it jumps (dp only for the adaptive ones)."""
    train_bytes: int = 2_000_000
    validation_bytes: int = 200_000
    validation_batches: int = 8
    checkpoint_dir: Path = Path("checkpoints")
    checkpoint_every: int = 250
    resume: bool = False
    """Continue from the newest intact checkpoint in checkpoint_dir."""
    overwrite: bool = False
    """Start a new run in a checkpoint_dir that holds checkpoints, deleting them."""
    profile_dir: Path | None = None
    metrics_dir: Path | None = None
    """Write TensorBoard events, CSV and an end-of-run PNG of every rank's step metrics here
    (None: nothing is written)."""
    sample_bytes: int = 240
    seed: int = 0
    timeout_s: float = 120.0
    """Bound on every wait for a peer; a dead or stalled rank ends the run with an error."""
    log_every: int = 10

    def __post_init__(self) -> None:
        positive = ("nproc", "pp_stages", "microbatches", "embed", "hidden", "layers",
                    "seq_len", "batch_size", "steps", "train_bytes", "validation_bytes",
                    "validation_batches", "checkpoint_every", "log_every")  # fmt: skip
        for name in positive:
            check_int(_flag(name), getattr(self, name), 1)
        check_int("--sample-bytes", self.sample_bytes, 0)
        # 32 bits, as numpy's seeds: the seeds derived from it (seed + epoch for the shuffle,
        # seed * 1_000_003 + step for the noise fault) stay far inside manual_seed's 64 bits.
        check_int("--seed", self.seed, 0, MAX_SEED)
        for name in ("parallel", "schedule", "balance", "comm", "backend", "cell", "slicing"):
            choices = get_args(_FIELD_TYPES[name])
            check_choice(_flag(name), getattr(self, name), choices)
        check_positive("--lr", self.lr)
        check_timeout_s("--timeout", self.timeout_s)
        check_bool("--resume", self.resume)
        check_bool("--overwrite", self.overwrite)
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --checkpoint-dir and --overwrite "
                             "deletes it: pass one of them")  # fmt: skip
        if self.validation_bytes <= self.seq_len:  # else the validation loss is a mean of none
            raise ValueError(
                f"--validation-bytes {self.validation_bytes} holds no window of --seq-len "
                f"{self.seq_len} (its bytes and the next one's): pass --validation-bytes "
                f"{self.seq_len + 1} or more"
            )
        if self.parallel != "dp" and self.slicing != "fixed":
            raise ValueError(
                f"--slicing {self.slicing} adapts data-parallel replicas and needs --parallel dp; "
                f"got --parallel {self.parallel}"
            )

    def layout(self, world_size: int) -> ParallelDims:
        """The replicas and stages of `world_size` ranks; raises when they do not fit."""
        from fastpar.training.parallel_dims import ParallelDims

        if self.parallel == "dp":
            return ParallelDims(dp=world_size, pp=1, world_size=world_size)
        if self.parallel == "pp":
            if world_size < 2:
                raise ValueError(f"--parallel pp needs at least 2 ranks, got {world_size}")
            dims = ParallelDims(dp=1, pp=world_size, world_size=world_size)
        elif world_size % self.pp_stages != 0 or world_size == self.pp_stages:
            raise ValueError(
                f"--parallel dp+pp needs a number of ranks that is a multiple of --pp-stages "
                f"{self.pp_stages} with at least 2 replicas; got {world_size} ranks"
            )
        else:
            dims = ParallelDims(dp=world_size // self.pp_stages, pp=self.pp_stages,
                                world_size=world_size)  # fmt: skip
        self._check_pipeline_fits(dims.pp)
        return dims

    def num_stages(self, pipeline_ranks: int) -> int:
        """Global pipeline stages of a pipeline over `pipeline_ranks` ranks: two chunks per rank
        with an interleaved schedule."""
        chunked = pipeline_ranks > 1 and self.schedule in CHUNKED_SCHEDULES
        return pipeline_ranks * (2 if chunked else 1)

    def _check_pipeline_fits(self, pipeline_ranks: int) -> None:
        """Refuse, before any rank starts, a pipeline the model or the batch cannot fill."""
        stages, modules = self.num_stages(pipeline_ranks), self.layers + 2
        if stages > modules:
            raise ValueError(
                f"--schedule {self.schedule} on {pipeline_ranks} pipeline ranks cuts the model "
                f"into {stages} stages of at least one module each, and the model has {modules} "
                f"(embedding, --layers {self.layers}, head): pass --layers {stages - 2} or more"
            )
        if self.microbatches > self.batch_size:
            raise ValueError(
                f"--microbatches {self.microbatches} needs --batch-size >= {self.microbatches} "
                f"(a micro-batch holds at least one window); got --batch-size {self.batch_size}"
            )


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


_FIELD_TYPES = {
    "parallel": ParallelMode,
    "schedule": ScheduleName,
    "balance": BalanceName,
    "comm": CommName,
    "backend": BackendName,
    "cell": CellName,
    "slicing": SlicingMode,
}
