"""`BackwardSync`: what a synchronised backward does to the buckets, from the first gradient
hook to the end-of-backward callback, and what is left to undo when a backward raised.

1. During backward, a post-accumulate-grad hook makes `param.grad` its bucket view, divided by
   the world size on the way (a fresh gradient, after `zero_grad(set_to_none=True)`, is
   multiplied into the view in the one pass that copies it; one that autograd accumulated into
   the view is scaled in place), so the all-reduce is a plain sum and no pass over the
   gradients follows it: the same arithmetic as DDP, which also divides before summing. A
   sparse gradient (`Embedding(sparse=True)`) is copied in dense, so `.grad` is dense from then
   on (DDP's values; SGD and Adagrad take it, SparseAdam refuses it). When the last gradient of
   a bucket arrives, and communication overlaps backward (`overlap`), that bucket's all-reduce
   is launched asynchronously (fastpar's ring or hierarchical all-reduce; torch.distributed
   otherwise: NCCL runs on its own CUDA stream, gloo and fastpar's CPU all-reduces on their own
   threads) while autograd keeps computing. On a CPU host where every core already runs a
   rank's compute thread, an all-reduce during backward only takes turns with compute (a 1 MiB
   bucket took 8-10 ms there, 0.1 ms after backward), so by default buckets wait for the end.
2. A callback queued on the autograd engine runs when backward finishes: it launches the
   buckets not launched yet (also those that still miss gradients, see "unused parameters")
   and waits for every bucket. Without overlap it runs them itself, one after the other: a
   hand-over to the communication thread and back only adds wake-ups when nothing is left to
   overlap. `backward()` returns after that, with every `param.grad` holding the average.

Measurements: `last_stats` (`CommStats`) holds the last synchronised backward's communication,
timed on the host as the hooks and the final wait run (no extra synchronisation): how long the
all-reduces took from the first launch to the last completion, and how much of that was exposed,
i.e. waited for after autograd had finished. On CUDA, torch.distributed's (NCCL's) `wait()` only
orders the streams, so there the figures are host-side (launch and enqueue) times unless the
caller synchronises; fastpar's CUDA ring's `wait()` also waits on the host for the kernel (to
raise what the device found), so its figures include the device's time.

Failures: if an all-reduce fails (a peer died, hung or called differently), `backward()` raises
that error, which names the rank, after every bucket's work has ended, and sets every `.grad` to
None first: an optimizer step that runs anyway (the error caught) changes nothing, and no rank
ever steps on its own unreduced gradients. A wait for gloo that runs out leaves the wrapper
unusable (waits.py). A backward that raised before its end (in autograd or a gradient hook, on
every rank) is forgotten at the next forward, which sets every `.grad` to None (they were never
averaged) and logs a warning; later backwards synchronise as usual. `close()` forgets it too,
after waiting (within the timeout) for the all-reduces it launched, so that none writes into a
bucket afterwards. Forgetting a backward also issues the all-reduces it did not launch, with
its "used" flags set to -inf (ABANDONED): each rank thus issues every bucket's all-reduce once
per backward, and a peer whose backward of that step went through (only this rank raised)
finds the last bucket's flags not finite and raises too, instead of summing this rank's next
step into its own. The last bucket is launched at the end of backward only, never during it,
so a backward that raised always has it left for this. A backward that raises before any
gradient hook ran left nothing behind and is not seen: the peers then wait for this rank's
next backward, as for a rank that skipped one.

Unused parameters: a parameter that gets no gradient in an iteration never blocks the job.
Each bucket carries one extra element per parameter, 1 where this rank produced the gradient
(in this backward or in a `no_sync()` one since the last synchronised backward), summed by the
same all-reduce. A parameter used by some rank gets the sum over ranks of the gradients they
hold divided by the world size (a rank that did not use it in this backward contributes the
`.grad` it accumulated before, zeros if None), exactly as DDP with
`find_unused_parameters=True`. A parameter no rank used keeps its `.grad` as it was (None after
`zero_grad()`), so optimizers skip it, again as DDP does. Those flags are read on the host (one
synchronisation per backward) only in a backward where this rank left a parameter unused;
otherwise every parameter was used and nothing needs reading.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fastpar._logging import get_logger
from fastpar.comm.errors import CommClosedError, CommTimeoutError
from fastpar.parallel.data_parallel.buckets import FINISHED, Bucket, is_view, scale_into
from fastpar.parallel.data_parallel.config import CommStats
from fastpar.parallel.data_parallel.waits import deadline, still_running, wait_within
from fastpar.profiling import record_range

__all__ = ["BackwardSync", "check_not_hooked"]

logger = get_logger(__name__)

# The BackwardSyncs whose gradient hooks are registered: a parameter must be in one at most.
# A sync whose wrapper was dropped without close() stays here, kept alive by its hooks.
_hooked: weakref.WeakSet[BackwardSync] = weakref.WeakSet()

# The "used" flag a rank sends for a backward it abandoned: any sum with it is not finite.
ABANDONED = float("-inf")


def check_not_hooked(module: nn.Module) -> None:
    """Refuse parameters whose gradients an open DataParallel averages already: both hooks
    would scale and all-reduce them, each gradient ending divided by the world size twice."""
    for name, param in module.named_parameters():
        if any(id(param) in sync.param_index for sync in _hooked):
            raise ValueError(
                f"parameter {name!r} belongs to another DataParallel that was not closed; call "
                f"its close() before wrapping the module again (e.g. after unfreezing layers)"
            )


class BackwardSync:
    """The gradient hooks and end-of-backward callback over `buckets`, and the state one
    synchronised backward keeps between them.

    Arguments:
        params: the parameters that require gradients, in registration order.
        buckets: the buckets of `params`, in launch order.
        world_size: the group's size (each gradient is divided by it).
        overlaps_backward: whether a complete bucket is launched during backward.
        timeout_s: how long the end of backward waits for torch.distributed's all-reduces
            (None: the group's timeout).
        group: the process group (for the messages).
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        buckets: list[Bucket],
        *,
        world_size: int,
        overlaps_backward: bool,
        timeout_s: float | None,
        group: dist.ProcessGroup,
    ) -> None:
        self.param_index = {id(p): i for i, p in enumerate(params)}
        self.buckets = buckets
        self._hooks: list[Any] = []
        self.overlaps_backward = overlaps_backward
        self.timeout_s = timeout_s
        self.group = group
        self.sync_enabled = True  # False inside no_sync()
        self._grad_scale = 1.0 / world_size
        self._lock = threading.Lock()
        self._callback_queued = False
        self._next_bucket = 0  # the next bucket to launch in this backward
        self._some_unused = False  # whether this rank left a parameter unused in this backward
        # What happened in the last backward, in order: ("grad", param index) as hooks fire,
        # ("launch", bucket index) as all-reduces start, ("end",) when backward finished.
        self.last_backward_events: list[tuple[Any, ...]] = []
        self.last_stats = CommStats()
        self._first_grad_at = self._first_launch_at = 0.0
        # Why this wrapper is unusable (a torch.distributed all-reduce that timed out may still
        # write into its buckets); None while it is usable
        self.unusable: str | None = None

    def check_usable(self) -> None:
        if self.unusable is not None:
            raise CommClosedError(self.unusable)

    def register_hooks(self) -> None:
        """Register every parameter's gradient hook (until `remove_hooks`)."""
        self._hooks = [
            param.register_post_accumulate_grad_hook(self._make_hook(bucket, slot, position))
            for bucket in self.buckets
            for slot, param in enumerate(bucket.params)
            for position in [self.param_index[id(param)]]
        ]
        _hooked.add(self)

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        _hooked.discard(self)

    # --- during backward --------------------------------------------------------------------

    def _make_hook(self, bucket: Bucket, slot: int, position: int) -> Any:
        """The post-accumulate-grad hook of `bucket.params[slot]`, the `position`-th parameter
        that requires gradients."""
        view = bucket.views[slot]

        def hook(param: torch.Tensor) -> None:
            if not self.sync_enabled:
                bucket.accumulated[slot] = True
                return
            self._start_backward_if_needed()
            with self._lock:
                self.last_backward_events.append(("grad", position))
                twice = bucket.ready[slot]
                bucket.ready[slot] = True
            if twice:
                self._refuse_second_gradient(position)
            grad = param.grad
            assert grad is not None  # post-accumulate hooks fire after .grad is set
            if not is_view(grad, view):
                scale_into(view, grad, self._grad_scale)
                param.grad = view
            elif self._grad_scale != 1.0:  # autograd accumulated into the view
                with torch.no_grad():
                    view.mul_(self._grad_scale)
            with self._lock:
                bucket.pending -= 1
                if self.overlaps_backward:
                    # The last bucket waits for the end of backward: a backward that raises
                    # before its end always has it left to tell the peers (`_tell_peers`)
                    self._launch_ready_buckets(until=len(self.buckets) - 1)

        return hook

    def _refuse_second_gradient(self, position: int) -> None:
        """A parameter's gradient arrived twice in one synchronised backward (DDP: "marked as
        ready twice"). The first one is in its bucket, maybe all-reduced already: nothing can
        be averaged any more, so every .grad is dropped and the backward raises."""
        self._drop_gradients()
        raise RuntimeError(
            f"DataParallel: parameter {position} (counting those that require gradients, in "
            "registration order) got a second gradient in one synchronised backward, so no "
            "gradient can be averaged and every .grad was set to None. Either this backward "
            "retries one that raised before its end, without a forward in between (run the "
            "forward again: a backward that raised is forgotten there), or the parameter gets "
            "gradients in several autograd graph tasks: it is used in more than one reentrant "
            "activation checkpoint, or both inside and outside one (use_reentrant=False avoids "
            "that)"
        )

    def _launch_ready_buckets(self, until: int) -> None:
        """Launch the complete buckets before index `until`. Collectives must be issued in the
        same order on every rank, so buckets launch in index order: a complete bucket waits
        for the ones before it (as in DDP)."""
        while self._next_bucket < until:
            bucket = self.buckets[self._next_bucket]
            if bucket.pending > 0:
                return
            self._launch(bucket)
            self._next_bucket += 1

    def _start_backward_if_needed(self) -> None:
        with self._lock:
            if self._callback_queued:
                return
            # Once per backward, in its first hook, before it writes into a bucket (only the
            # end of a backward, or a forward outside one, makes the wrapper unusable)
            self.check_usable()
            self._callback_queued = True
            self.last_backward_events = []
            self._first_grad_at = time.perf_counter()
            self._first_launch_at = 0.0
            # "used" flags: 1 unless this rank leaves a parameter unused (the last sum is there)
            for bucket in self.buckets:
                bucket.flags.fill_(1)
        torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)

    def _launch(self, bucket: Bucket) -> None:
        self.last_backward_events.append(("launch", bucket.index))
        if not self._first_launch_at:
            self._first_launch_at = time.perf_counter()
        with record_range(f"fastpar.dp.allreduce.bucket{bucket.index}"):
            # torch.distributed's synchronous call is its asynchronous one waited for with no
            # bound but the group's timeout: its work is waited for at the end, within ours.
            if self.overlaps_backward or bucket.through_torch:
                bucket.work = bucket.comm(bucket.buffer, True)
            else:  # backward is over: this thread runs it, with no hand-over to another
                bucket.comm(bucket.buffer, False)
                bucket.work = FINISHED

    # --- at the end of backward -------------------------------------------------------------

    @torch.no_grad()
    def _mark_unused(self, bucket: Bucket) -> None:
        """Parameters that got no gradient in this backward contribute the gradient they hold
        (accumulated under no_sync(), or left from an earlier backward; zeros if None), as DDP
        does, and a 0 flag unless a no_sync() backward since the last sync gave them one."""
        for slot, ready in enumerate(bucket.ready):
            if ready:
                continue
            self._some_unused = True
            param, view = bucket.params[slot], bucket.views[slot]
            if param.grad is None:
                view.zero_()
            elif is_view(param.grad, view):
                param.grad = view.clone()  # kept as it was if no rank uses the parameter
                view.mul_(self._grad_scale)
            else:
                scale_into(view, param.grad, self._grad_scale)
            bucket.flags[slot] = 1 if bucket.accumulated[slot] else 0
            bucket.ready[slot] = True
        bucket.pending = 0

    def _finish_backward(self) -> None:
        started = time.perf_counter()
        error: BaseException | None = None
        with record_range("fastpar.dp.wait"):
            try:
                with self._lock:
                    for bucket in self.buckets[self._next_bucket :]:
                        if bucket.pending > 0:
                            self._mark_unused(bucket)
                    self._launch_ready_buckets(until=len(self.buckets))
                error = self._wait_for_launched()
                if error is None:
                    error = self._peer_abandoned()
                if error is None and self._some_unused:
                    self._expose_used_elsewhere()
            except Exception as failure:  # re-raised below
                error = error or failure
            finally:
                with self._lock:
                    self.last_backward_events.append(("end",))
                self._record_stats(started)
                self._reset_backward_state()
        if error is not None:
            self._drop_gradients()
            error.add_note(
                "DataParallel: gradients were not averaged, so every parameter's .grad was set "
                "to None (an optimizer step changes nothing)"
            )
            raise error

    def _peer_abandoned(self) -> RuntimeError | None:
        """The error to raise when a peer abandoned its backward of this step (its last bucket
        carries ABANDONED flags, see `_tell_peers`): these sums mix its partial gradients in.
        Reads one flag on the host, so on CUDA the end of backward waits for the last
        all-reduce."""
        if torch.isfinite(self.buckets[-1].flags[0]).item():
            return None
        return RuntimeError(
            "DataParallel: another rank's backward of this step raised before its end (that "
            "rank abandoned it at its next forward or close()), so this step's gradients "
            "cannot be averaged; skip this step on this rank too"
        )

    def _wait_for_launched(self) -> BaseException | None:
        """Wait for every launched all-reduce, even after one failed: no work may still write
        into a bucket (a .grad) once backward has returned. torch.distributed's are waited for
        within the timeout, all of them together (one still running then makes the wrapper
        unusable, see `wait_within`). Returns the first failure."""
        error: BaseException | None = None
        until = deadline(self.timeout_s)
        for bucket in self.buckets:
            if bucket.work is None:
                continue
            try:
                if bucket.through_torch:
                    what = f"the all-reduce of gradient bucket {bucket.index}"
                    try:
                        wait_within(bucket.work, until, what, bucket.buffer.device,
                                    timeout_s=self.timeout_s, group=self.group)  # fmt: skip
                    except CommTimeoutError as timeout:  # gloo goes on with it
                        self.unusable = still_running(timeout)
                        raise
                else:  # fastpar's all-reduce bounds its own waits
                    bucket.work.wait()
            except Exception as failure:  # the caller raises it
                error = error or failure
        return error

    def _reset_backward_state(self) -> None:
        """Nothing launched, no gradient arrived: ready for the next synchronised backward."""
        with self._lock:
            self._callback_queued = False
            self._next_bucket = 0
            self._some_unused = False
            for bucket in self.buckets:
                bucket.work = None
                bucket.pending = len(bucket.params)
                bucket.ready = [False] * len(bucket.params)
                bucket.accumulated = [False] * len(bucket.params)

    def _record_stats(self, autograd_done: float) -> None:
        now = time.perf_counter()
        launched = [bucket for bucket in self.buckets if bucket.work is not None]
        self.last_stats = CommStats(
            backward_s=now - self._first_grad_at,
            # Launched when backward ended (overlap off): launching is part of the all-reduce.
            allreduce_s=now - min(self._first_launch_at, autograd_done) if launched else 0.0,
            exposed_s=now - autograd_done,
            buckets=len(launched),
            bytes=sum(b.buffer.numel() * b.buffer.element_size() for b in launched),
        )

    def _expose_used_elsewhere(self) -> None:
        """Give the parameters this rank left unused but another rank used their averaged
        gradient (every parameter this rank used has its bucket view as .grad already)."""
        used_by = torch.cat([bucket.flags for bucket in self.buckets]).tolist()
        position = 0
        for bucket in self.buckets:
            for param, view in zip(bucket.params, bucket.views, strict=True):
                if used_by[position] != 0 and not is_view(param.grad, view):
                    param.grad = view
                position += 1

    def _drop_gradients(self) -> None:
        for bucket in self.buckets:
            for param in bucket.params:
                param.grad = None

    # --- a backward that raised before its end ------------------------------------------------

    def unfinished_backward_left(self) -> bool:
        """Whether the last synchronised backward raised before its end (in autograd or a hook),
        so its end-of-backward callback never ran; not while called inside a backward (-1:
        outside any; activation checkpointing recomputes forwards within one)."""
        return self._callback_queued and torch._C._current_graph_task_id() == -1

    def forget_unfinished_backward(self) -> BaseException | None:
        """Launch the buckets the unfinished backward did not launch, flagged ABANDONED
        (`_tell_peers`), wait for every all-reduce it launched (none may still write into a
        bucket), forget its state (it would keep every later backward from synchronising),
        and drop its gradients, never averaged. Returns the error of an all-reduce."""
        launch_error = self._tell_peers()
        error = self._wait_for_launched() or launch_error
        self._reset_backward_state()
        self._drop_gradients()
        return error

    def _tell_peers(self) -> BaseException | None:
        """Issue the all-reduces of the buckets this backward did not launch, with every flag
        ABANDONED. Every rank then issues each bucket's all-reduce once per backward, finished
        or not, so a peer whose backward went through does not sum this rank's next step into
        this one; and the last bucket, never launched before the end of backward, tells it
        that this step cannot be averaged (`_peer_abandoned`). Returns a launch's error."""
        try:
            with self._lock:
                for bucket in self.buckets[self._next_bucket :]:
                    bucket.flags.fill_(ABANDONED)
                    self._launch(bucket)
                    self._next_bucket += 1
        except Exception as failure:  # the caller raises it
            return failure
        return None

    def abandon_unfinished_backward(self) -> None:
        """At a forward after an unfinished backward: forget it (`forget_unfinished_backward`)
        and raise its all-reduce's error, else warn."""
        error = self.forget_unfinished_backward()
        message = (
            "DataParallel: the last synchronised backward raised before its end, so its "
            "gradients were not averaged and every parameter's .grad was set to None"
        )
        if error is not None:
            error.add_note(message)
            raise error
        logger.warning(message)
