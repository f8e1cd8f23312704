"""Pipeline model parallelism: consecutive stages of a model on different ranks, fed with
micro-batches under a schedule.

    stages = split_sequential(model, [4])             # layers [0, 4) and [4, end)
    pipe = Pipeline(stages[rank], stage_index=rank, num_stages=2, loss_fn=nn.MSELoss())
    loss = pipe.step(x, y)                            # the loss on the last stage, else None
    optimizer.step()

Several chunks per rank (w ranks, looped placement):

    chunks = split_sequential(model, 2 * w, balance="auto", example_input=x[:8])  # collective:
    # every rank calls it; rank 0 times the layers and every rank takes its cuts
    pipe = Pipeline([chunks[rank], chunks[rank + w]], stage_index=[rank, rank + w],
                    num_stages=2 * w, schedule="interleaved-1f1b", loss_fn=...)

Schedules (p stages, m micro-batches; F forward, B backward, I / W its input / weight parts):
    "gpipe"             all forwards, then all backwards; m micro-batches' activations alive.
    "1f1b"              warm-up forwards, then one forward and one backward in turn: at most
                        p - s micro-batches in flight on stage s. Bubble (p-1)/(m+p-1).
    "interleaved-1f1b"  v chunks per rank, looped; bubble (p-1)/(v m + p-1) when w divides m,
                        for somewhat more activation memory.
    "zero-bubble"       ZB-H1: I passes go back at once, W passes fill the bubble; activations
                        held no longer than under 1F1B, and no rank holds more micro-batches
                        (deferred W state included) than 1F1B's first stage. Idle
                        (p-1)(F+B-2W) per rank for equal stages, as ZB-H1.
    "zbv"               zero-bubble with two chunks per rank in a V (rank r: stages r and
                        2w-1-r, so rank 0 holds the first and the last stage).

The package, one role per module:
    schedules.py       pure schedules: per-rank action lists (no processes, no tensors)
    simulate.py        replaying a schedule with stage times (`ideal_bubbles`)
    stages.py          `split_sequential` (given cuts or balanced by profiling), `OutputOnly`,
                       `StageLayers` (the layers a stage holds, checked at the handshake)
    split_backward.py  splitting a backward into input and weight passes
    split_recurrence.py  the split of fastpar's LSTM / GRU / RNN ops (W_hh, W_hr, W_ih deferred)
    grad_accumulate.py   adding a deferred gradient into .grad
    handshake.py       the construction handshake (every rank checks every rank's arguments)
    wire.py            message headers and `PipelineError`
    links.py           the `Link` protocol, `LocalLink`; shm_link.py, torch_link.py
    plan.py            a rank's step compiled once into one function per action
    executor.py        `Pipeline`
"""

from fastpar.parallel.pipeline.config import PipelineConfig, StepStats
from fastpar.parallel.pipeline.executor import Pipeline
from fastpar.parallel.pipeline.schedules import SCHEDULES, schedule_actions
from fastpar.parallel.pipeline.simulate import ideal_bubbles
from fastpar.parallel.pipeline.split_backward import register_weight_split
from fastpar.parallel.pipeline.stages import OutputOnly, split_sequential
from fastpar.parallel.pipeline.wire import PipelineError

__all__ = [
    "SCHEDULES",
    "OutputOnly",
    "Pipeline",
    "PipelineConfig",
    "PipelineError",
    "StepStats",
    "ideal_bubbles",
    "register_weight_split",
    "schedule_actions",
    "split_sequential",
]
