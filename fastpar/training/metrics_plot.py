"""The end-of-run picture of `fastpar train --metrics`: one column of panels sharing the step
axis — loss (train, and validation where measured), tokens/s, the block of every replica (the
dynamic slicer's decisions, grow/shrink marked), and exposed communication / bubble when the
layout has replicas / stages."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from fastpar.training.parallel_dims import ParallelDims

if TYPE_CHECKING:
    from fastpar.training.metrics_files import Series


def _smooth(values: list[float], width: int) -> list[float]:
    """Trailing mean over `width` points (the raw per-step series is noisy on a busy host)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= width:
            total -= values[i - width]
        out.append(total / min(i + 1, width))
    return out


def plot_run(series: Series, dims: ParallelDims, title: str, path: Path) -> None:
    """Draw `series` into the PNG `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    overheads = dims.dp > 1 or dims.pp > 1
    panels = 4 if overheads else 3
    fig, axes = plt.subplots(panels, 1, sharex=True, figsize=(7.0, 1.9 * panels), dpi=80)
    steps = series.steps
    width = max(1, len(steps) // 50)

    loss_axis = axes[0]
    loss_axis.plot(steps, series.loss, lw=0.6, alpha=0.35, color="C0")
    loss_axis.plot(steps, _smooth(series.loss, width), lw=1.2, color="C0", label="train")
    if series.validation:
        v_steps, v_loss = zip(*series.validation, strict=True)
        loss_axis.plot(v_steps, v_loss, "o-", ms=4, color="C3", label="validation")
    loss_axis.set_ylabel("loss (nats/byte)")
    loss_axis.legend(loc="upper right", fontsize=8)

    rate_axis = axes[1]
    rate_axis.plot(steps, series.tokens_per_s, lw=0.6, alpha=0.35, color="C2")
    rate_axis.plot(steps, _smooth(series.tokens_per_s, width), lw=1.2, color="C2")
    rate_axis.set_ylabel("tokens/s")
    rate_axis.set_ylim(bottom=0)

    block_axis = axes[2]
    if any(series.blocks):
        # A run resumed on another layout has another number of replicas (or fixed slicing,
        # no blocks) before its checkpoint: each replica's line has a gap where it did not run.
        for replica in range(max(map(len, series.blocks))):
            blocks = [b[replica] if replica < len(b) else math.nan for b in series.blocks]
            block_axis.step(steps, blocks, where="post", lw=1.2, label=f"replica {replica}")
        # Shrinks are rare and always marked; grows only while few enough to tell apart.
        for event, marker, color, limit in (("grow", "^", "C2", 60), ("shrink", "v", "C3", None)):
            marked = [(s, b[0]) for s, b, e in zip(steps, series.blocks, series.decisions,
                                                    strict=True) if e == event and b]  # fmt: skip
            if marked and (limit is None or len(marked) <= limit):
                xs, ys = zip(*marked, strict=True)
                block_axis.plot(xs, ys, marker, ls="none", ms=4, color=color, label=event)
        block_axis.legend(loc="upper right", fontsize=8)
        block_axis.set_ylabel("block (samples)")
    else:
        block_axis.text(0.5, 0.5, "fixed slicing: equal blocks", ha="center", va="center",
                        transform=block_axis.transAxes)  # fmt: skip
        block_axis.set_yticks([])

    if overheads:
        share_axis = axes[3]
        if dims.dp > 1:
            share_axis.plot(steps, _smooth(series.exposed, width), label="exposed comm")
        if dims.pp > 1:
            share_axis.plot(steps, _smooth(series.bubble, width), label="bubble")
        share_axis.set_ylabel("share of step")
        share_axis.set_ylim(0, 1)
        share_axis.legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("step")
    axes[0].set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
