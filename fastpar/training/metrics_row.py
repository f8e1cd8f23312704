"""The fields of the row each rank records per step (`metrics`), in a module without torch: the
CSV columns built from them (`metrics_files`) are checked by the launcher of `fastpar train
--metrics --resume` before any rank starts."""

from __future__ import annotations

ROW = ("loss", "samples", "global_samples", "compute_s", "step_s", "allreduce_s", "exposed_s",
       "forward_s", "backward_s", "bubble")  # fmt: skip
"""The fields of one rank's step, in order (loss NaN on ranks that do not compute it)."""
