"""`HierarchicalAllReduce`: the all-reduce of a group whose ranks sit on several hosts, each host
holding the same number L >= 2 of them.

A call, on a tensor cut into L shards (shard l belongs to each host's l-th rank):
1. reduce-scatter inside each host: the l-th rank combines shard l of its host's ranks in rank
   order;
2. between hosts, the l-th ranks of all hosts all-reduce shard l through torch.distributed
   (gloo on CPU, NCCL on GPU) on a process group of their own, one per local index l, so the L
   shards of a host travel in parallel, each between its own processes;
3. all-gather inside each host.
On CPU, steps 1 and 3 go through the host's shared memory with barriers on fastpar's ring
(`host_passes`): chunk by chunk through a buffer of the host, or, for a tensor in the host's
symmetric memory (`empty_shared`), reading the peers' tensors where they lie; small calls skip
the scatter: every rank reduces the whole tensor and sends it between hosts. On CUDA the
CUDA-IPC ring all-reduces the tensor for step 1 and gathers the shards for step 3 (each rank
adds its shard to zeros elsewhere as 64-bit integers, which copies every bit exactly).
Every rank gets the same bits: inside a host each element is combined in rank order; between
hosts gloo's and NCCL's all-reduces give every rank the same result from the same inputs (with
two hosts it is a + b, the host-order fold; with more, the backend's fixed order).

Failures: the ring names a dead or late peer inside a host; the rank that meets a failure
posts it in the store, and ranks waiting on another host (for a shard that will not come) raise
the same error within about 0.2 s of it being posted, else when torch.distributed's wait ends
(the timeout). After a failure the object is unusable (CommClosedError), as the ring is.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from fastpar._checks import check_int, check_member, check_timeout
from fastpar._logging import get_logger, log_once
from fastpar.comm.errors import CommClosedError, CommError, CommMismatchError, CommTimeoutError
from fastpar.comm.exchange import StoreExchange
from fastpar.comm.fallback import dense, torch_all_reduce
from fastpar.comm.host_buffer import HostAreas, HostBuffer
from fastpar.comm.host_passes import CHUNK_BYTES, CallKey, CpuHostPasses, shard_length
from fastpar.comm.hosts import HostLayout, gather_host_layout
from fastpar.comm.ops import AVG, ring_op_code, unsupported_reason
from fastpar.comm.ring import RingAllReduce
from fastpar.comm.shared_area import (
    ALLOCATING,
    SharedMemoryUnavailableError,
    agree_on_allocation,
    describe_request,
)
from fastpar.comm.store_waits import LIVENESS_PERIOD_S, count_out
from fastpar.comm.timeouts import group_timeout
from fastpar.comm.work import RingWork, wait_ran_out

logger = get_logger(__name__)

NOTE_WAIT_S = 1.0  # after a lost exchange, how long to wait for a peer's account of the failure
_ERRORS = {cls.__name__: cls for cls in (CommTimeoutError, CommMismatchError, CommClosedError)}
_CREATING = "creating a HierarchicalAllReduce"  # for the messages of its setup's store waits


def _subgroup(ranks: list[int], name: str, timeout: timedelta) -> dist.ProcessGroup:
    """The process group of `ranks` (global ranks), created by those ranks alone.

    `new_group(use_local_synchronization=True)` would name the group after the count of groups
    each creator belongs to, which differs between the creators when they belong to different
    subgroups (then they wait for each other forever); here the name is fastpar's own, the same
    on every creator. torch's helper behind `new_group` does the rest.
    """
    c10d = dist.distributed_c10d
    default = c10d._get_default_group()
    backend = c10d.Backend(dist.get_backend(default))
    group, _ = c10d._new_process_group_helper(
        len(ranks), ranks.index(dist.get_rank()), ranks, backend,
        c10d._get_default_store(), c10d.GroupName(name), timeout=timeout,
        device_id=default.bound_device_id, group_desc=name,
    )  # fmt: skip
    c10d._world.pg_group_ranks[group] = {g: i for i, g in enumerate(ranks)}
    return group


class HierarchicalWork(RingWork):
    """An all-reduce of `tensor` running on `owner`'s worker thread (`future`, the worker's
    task, returns the CUDA event behind its last kernel, or None on CPU); `wait()` raises its
    error, or the error another rank posted while this one still waits for a shard, and on CUDA
    then orders the current stream after the call's last kernel. Its `timeout` bounds the wait
    (None or `timedelta(0)`: no bound of its own, as in torch; the call itself is bounded by the
    object's timeout); one that runs out raises TimeoutError, the call going on."""

    def __init__(
        self, future: Future[torch.cuda.Event | None], owner: HierarchicalAllReduce,
        tensor: torch.Tensor,
    ) -> None:  # fmt: skip
        super().__init__(future, tensor)
        self._owner = owner

    def _wait(self, timeout: timedelta | None) -> None:
        self._owner._result(self._future, timeout)
        done = self._future.result()
        if done is not None:
            torch.cuda.current_stream(self._owner.device).wait_event(done)

    def is_completed(self) -> bool:
        """Whether the all-reduce has finished (on CUDA: its kernels too), or failed."""
        if not self._future.done() or self._future.exception() is not None:
            return self._future.done()
        done = self._future.result()
        return done is None or done.query()


class HierarchicalAllReduce(contextlib.AbstractContextManager["HierarchicalAllReduce"]):
    """All-reduce over `group` when its ranks are on several hosts with L >= 2 ranks each.

    Arguments:
        group: the process group (None: the default group); this process must be a member.
        device: the device whose tensors it reduces ("cpu" or this rank's CUDA device).
        timeout: bound on every wait for a peer (timedelta or seconds; None: the group's own).
        layout: the group's hosts, when the caller has gathered them and says why this object
            is off (else gathered here, and the reason logged on global rank 0).
        chunk_bytes: CPU: bytes per chunk, a multiple of 64; each host's shared memory holds
            2 x (local ranks + 1) chunks.
        serve_shared_gpu: CUDA: passed to each host's RingAllReduce.

    Creating it is collective over `group` (it creates a process group per host and a ring in
    each). Where the layout does not fit (one host, one rank per host, uneven hosts) or a host's
    ring is off, every call goes to torch.distributed and `fallback_reason` says why. Dtypes and
    ops are the ring's (float32, float64, float16, bfloat16, int32, int64; SUM, AVG, PRODUCT,
    MIN, MAX); half types are accumulated in float32 in each step and rounded after each.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        *,
        device: torch.device | str = "cpu",
        timeout: timedelta | float | None = None,
        layout: HostLayout | None = None,
        chunk_bytes: int = CHUNK_BYTES,
        serve_shared_gpu: bool = False,
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("HierarchicalAllReduce needs torch.distributed to be initialised")
        self.group: dist.ProcessGroup = group if group is not None else dist.group.WORLD
        self.rank = check_member(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.device = torch.device(device)
        if self.device == torch.device("cuda"):  # this rank's GPU
            self.device = torch.device("cuda", torch.cuda.current_device())
        if timeout is None:
            self.timeout = group_timeout(self.group, self.device)
        else:
            self.timeout = check_timeout("timeout", timeout)
        self.layout = (
            layout
            if layout is not None
            else gather_host_layout(self.group, self.timeout, during=_CREATING)
        )
        self._ring: RingAllReduce | None = None
        self._passes: CpuHostPasses | None = None  # CPU: steps 1 and 3
        self._executor: ThreadPoolExecutor | None = None
        self._last: Future[None] | None = None
        self._closed = False
        self._failure = ""
        self._store_lock = threading.Lock()  # a failure posted vs this rank's leaving the store
        self._left_store = False
        self._workspace = torch.empty(0, dtype=torch.int64, device=self.device)
        path, reason = self.layout.path()
        self._disabled: str | None = None if path == "hierarchical" else reason
        if self._disabled is None:
            self._connect(chunk_bytes, serve_shared_gpu)
        if self._disabled is not None and layout is None and dist.get_rank() == 0:
            log_once(logger, f"fastpar hierarchical all-reduce is off: {self._disabled}")

    # --- setup ---------------------------------------------------------------------------------

    def _connect(self, chunk_bytes: int, serve_shared_gpu: bool) -> None:
        store = dist.distributed_c10d._get_default_store()
        setup = StoreExchange(store, self.rank, self.world_size, self.timeout, during=_CREATING)
        with setup:  # every rank through the setup, whatever its end: its keys are deleted
            # The first stage numbers the setup alike on every rank (one that missed a setup
            # the others gave up on joins their retry); the subgroups are named after it.
            setup.begin("hier", self.group, b"", "begin its setup")
            self._connect_through(setup, chunk_bytes, serve_shared_gpu)

    def _connect_through(
        self, setup: StoreExchange, chunk_bytes: int, serve_shared_gpu: bool
    ) -> None:
        ranks = dist.get_process_group_ranks(self.group)
        self._store, self._prefix = setup.store, setup.prefix
        layout = self.layout
        self._host, self._local = layout.host, layout.local_rank
        self._local_ranks = layout.hosts[self._host]
        name = self._prefix.replace("/", "_")
        local = [ranks[r] for r in self._local_ranks]
        self._local_group = _subgroup(local, f"{name}_host{self._host}", self.timeout)
        across = [ranks[host[self._local]] for host in layout.hosts]
        self._across = _subgroup(across, f"{name}_local{self._local}", self.timeout)
        ring = RingAllReduce(self._local_group, timeout=self.timeout, device=self.device,
                             serve_shared_gpu=serve_shared_gpu)  # fmt: skip
        try:
            problem = ring.fallback_reason(torch.empty(0, device=self.device)) or ""
            verdict = setup.agree("ring", problem, "say whether its host's ring works")
        except BaseException:
            ring.close()
            raise
        if verdict is not None:
            ring.close()
            self._disabled = f"the ring inside a host is off ({verdict})"
            return
        self._ring = ring  # on every rank: each leaves the store through close() or below
        try:
            if self.device.type == "cpu":
                self._passes = self._host_passes(setup, chunk_bytes)
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="fastpar-hier")
        except BaseException:
            self._ring = None
            ring.close()  # no call ever runs on it: a local close is enough
            self._leave_store()  # a failure its barrier posted goes with the last rank out
            raise

    def _host_passes(self, setup: StoreExchange, chunk_bytes: int) -> CpuHostPasses:
        """Steps 1 and 3 on CPU, through a buffer the host's ranks share."""
        local, size = self._local, len(self._local_ranks)
        buffer = HostBuffer(
            setup, f"buffer/{self._host}", local_rank=local, local_size=size,
            owner=self._local_ranks[0], chunk_bytes=chunk_bytes,
            barrier=lambda: self._barrier((0, 0, 0)),
        )  # fmt: skip
        return CpuHostPasses(
            buffer, HostAreas(local_rank=local, local_size=size), local_rank=local,
            local_size=size, barrier=self._barrier,
            between_hosts=lambda shard, op: self._wait_between_hosts(
                self._between_hosts(shard, op)),
        )  # fmt: skip

    # --- shared memory -------------------------------------------------------------------------

    def empty_shared(self, size: int, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A CPU tensor in memory that every rank of its host maps, at the same offset on each
        (collective over the group: every rank allocates the same sizes in the same order).

        `all_reduce` of a contiguous tensor inside it (all of it or a slice, the same on every
        rank), unless small enough for one barrier (`host_passes.WHOLE_BYTES`), reads the host's
        peers' tensors where they lie instead of going through the host's buffer: two copies
        of each shard fewer (`CpuHostPasses._in_area`), the same bits. It returns once no peer
        on its host reads this rank's tensor any more, so the tensor may be written again. The
        memory is released once the tensor (and every view of it) is gone and this object is
        closed. Arguments, result and errors as `RingAllReduce.empty_shared` (a zero-filled 1-D
        tensor of `size` elements of `dtype`), and SharedMemoryUnavailableError on every rank
        where this object does not run (off, or on CUDA); every rank names the rank that
        failed first, or lists every rank's request when they differ, across hosts too.
        """
        check_int("size", size, 0)
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
        if self._closed:
            raise CommClosedError("this HierarchicalAllReduce was closed")
        if self._disabled is not None:
            raise SharedMemoryUnavailableError(f"the hierarchical all-reduce is off: "
                                               f"{self._disabled}")  # fmt: skip
        if self._passes is None:
            raise SharedMemoryUnavailableError("shared areas serve CPU tensors only so far")
        tensor, failure = None, None
        try:
            tensor = self._passes.areas.allocate(
                self._store, self._local_group, numel=size, dtype=dtype, timeout=self.timeout
            )
        except (SharedMemoryUnavailableError, CommMismatchError) as error:
            failure = type(error)(f"rank {self.rank} could not allocate: inside host "
                                  f"{self._host}: {self._group_ranks(str(error))}")  # fmt: skip
        outcome = StoreExchange(self._store, self.rank, self.world_size, self.timeout,
                                during=ALLOCATING)  # fmt: skip
        try:  # every host learns every other host's outcome
            with outcome:
                request = describe_request(size, dtype)
                agree_on_allocation(outcome, "hier-area", self.group, request=request,
                                    failure=failure)  # fmt: skip
        except CommError:
            if tensor is not None:
                self._passes.areas.forget_last()
            raise
        assert tensor is not None
        return tensor

    def in_shared_area(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor`'s elements lie in memory from this object's `empty_shared`."""
        return (self._passes is not None and tensor.device.type == "cpu"
                and self._passes.areas.find(tensor) is not None)  # fmt: skip

    # --- calls ---------------------------------------------------------------------------------

    def fallback_reason(self, tensor: torch.Tensor, op: object = dist.ReduceOp.SUM) -> str | None:
        """Why `all_reduce(tensor, op)` would go to torch.distributed; None when it runs here."""
        if self._closed:
            return "this HierarchicalAllReduce was closed"
        if tensor.device != self.device:
            return f"tensor is on {tensor.device}; this all-reduce serves {self.device}"
        if self._disabled is not None:
            return self._disabled
        reason = unsupported_reason(tensor.dtype, ring_op_code(op), op)
        if reason is None and self._ring is not None:
            reason = self._ring.fallback_reason(tensor, op)  # e.g. a size limit between GPUs
        return reason

    def should_use(self, tensor: torch.Tensor, op: object = dist.ReduceOp.SUM) -> bool:
        """Whether `all_reduce(tensor, op)` runs here (False: on torch.distributed)."""
        return isinstance(tensor, torch.Tensor) and self.fallback_reason(tensor, op) is None

    def all_reduce(self, tensor: torch.Tensor, op: object = dist.ReduceOp.SUM,
                   group: dist.ProcessGroup | None = None, async_op: bool = False,
                   ) -> HierarchicalWork | dist.Work | object | None:  # fmt: skip
        """In place, as `torch.distributed.all_reduce`: see the class for what runs here.

        Raises:
            CommTimeoutError: a peer (on this host or another) died or did not arrive.
            CommMismatchError: ranks of one host called differently.
            CommClosedError: closed, or unusable after an earlier failure.
        """
        if self._closed:
            raise CommClosedError("this HierarchicalAllReduce was closed")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
        if group is not None and group is not self.group:
            raise ValueError("group must be None or the group this object was created for")
        reason = self.fallback_reason(tensor, op)
        if reason is not None:
            log_once(logger, f"fastpar all_reduce goes to torch.distributed: {reason}")
            return torch_all_reduce(tensor, op, self.group, async_op)
        if self._failure:
            raise CommClosedError(f"unusable after an earlier failure: {self._failure}")
        code = ring_op_code(op)
        if code == AVG and not tensor.is_floating_point():
            raise ValueError(f"op AVG needs a floating-point tensor, got {tensor.dtype}")
        if not tensor.is_contiguous():
            dense(tensor)  # refuses overlapping views here, not on the worker
        assert self._executor is not None
        # CUDA: the worker enqueues on the caller's stream, where the tensor was produced (its
        # own current stream is the default one, which the ring's stream does not wait for).
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        self._last = self._executor.submit(self._run, tensor, op, code, stream)
        work = HierarchicalWork(self._last, self, tensor)
        if async_op:
            return work
        work.wait()
        return None

    def _run(
        self, tensor: torch.Tensor, op: object, code: int, stream: torch.cuda.Stream | None
    ) -> torch.cuda.Event | None:
        """The call, on the worker; CUDA: enqueued on `stream` (the caller's), returning an
        event behind its last kernel for `HierarchicalWork.wait`."""
        # (torch.cuda.stream(None) would initialise CUDA for a CPU call on a GPU host.) No grad:
        # as in torch.distributed, autograd does not see the update.
        on_stream = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with on_stream, torch.no_grad():
            target = dense(tensor)
            inner = dist.ReduceOp.SUM if code == AVG else op
            flat = target.view(-1)
            if self._passes is not None:
                self._passes.run(flat, inner, code)
            else:
                self._run_ring(flat, inner)
            if code == AVG:
                flat.div_(self.world_size)
            if target is not tensor:
                tensor.copy_(target)
        if stream is None:
            return None
        done = torch.cuda.Event()
        done.record(stream)
        return done

    def _shard(self, count: int, align: int) -> tuple[int, int]:
        """[lo, hi) of `count` elements that this rank reduces (`shard_length` each)."""
        per = shard_length(count, len(self._local_ranks), align)
        return min(self._local * per, count), min((self._local + 1) * per, count)

    def _barrier(self, key: CallKey) -> None:
        """Wait for the host's ranks (the ring's bounds and failure naming); every one raises
        CommMismatchError when they passed different calls (`host_passes.call_key`)."""
        sent = [value for part in key for value in (part, -part)]
        agreed = torch.tensor(sent, dtype=torch.int64)
        self._local_all_reduce(agreed, dist.ReduceOp.MAX)
        if agreed.tolist() != sent:
            high, low = agreed[0].item(), -agreed[1].item()
            if high != low:
                what = f"different sizes ({low} to {high} elements)"
            elif agreed[2] != -agreed[3]:
                what = "different dtypes or ops"
            else:
                what = ("tensors in different places (ordinary memory, or shared areas at "
                        "different offsets)")  # fmt: skip
            message = (f"inside host {self._host}: ranks {list(self._local_ranks)} called "
                       f"all_reduce with {what}")  # fmt: skip
            self._post("CommMismatchError", message)
            raise CommMismatchError(message)

    def _run_ring(self, flat: torch.Tensor, op: object) -> None:
        """CUDA: the ring all-reduces the whole tensor inside the host, each rank exchanges its
        shard between hosts, and the ring gathers the shards: each rank adds its shard to zeros
        elsewhere as 64-bit integers, which copies every bit exactly."""
        n, size = flat.numel(), flat.element_size()
        local_size = len(self._local_ranks)
        shard = shard_length(n, local_size, 8 // size)
        self._local_all_reduce(flat, op)
        lo, hi = self._shard(n, 8 // size)
        mine = flat[lo:hi]
        if hi > lo:
            self._wait_between_hosts(self._between_hosts(mine, op))
        words = self._words(local_size * shard * size // 8)
        words.zero_()
        gathered = words.view(flat.dtype)
        gathered[self._local * shard : self._local * shard + (hi - lo)] = mine
        self._local_all_reduce(words, dist.ReduceOp.SUM)
        flat.copy_(gathered[:n])
        # Callers' streams may differ from call to call: the workspace is not reallocated (on
        # growth) under this stream's pending copy.
        words.record_stream(torch.cuda.current_stream(self.device))

    def _words(self, count: int) -> torch.Tensor:
        if self._workspace.numel() < count:
            self._workspace = torch.empty(count, dtype=torch.int64, device=self.device)
        return self._workspace[:count]

    def _local_all_reduce(self, tensor: torch.Tensor, op: object) -> None:
        assert self._ring is not None
        try:
            self._ring.all_reduce(tensor, op)
        except CommError as error:
            message = f"inside host {self._host}: {self._group_ranks(str(error))}"
            self._post(type(error).__name__, message)
            raise type(error)(message) from None

    def _between_hosts(self, shard: torch.Tensor, op: object) -> Any:
        """Start the all-reduce of `shard`, in place, with the same-index ranks of the other
        hosts; its work goes to `_wait_between_hosts`."""
        try:
            return dist.all_reduce(shard, op=op, group=self._across, async_op=True)
        except RuntimeError as error:
            raise self._lost(error) from None

    def _wait_between_hosts(self, work: Any) -> None:
        if work is None:
            return
        try:
            work.wait()
        except RuntimeError as error:
            raise self._lost(error) from None

    def _lost(self, error: RuntimeError) -> CommError:
        """The error for a failed all-reduce between hosts: the failure a peer posted (the
        cause, usually), else this one, posted for the others."""
        note = self._read_note(wait_s=NOTE_WAIT_S)
        if note is None:
            peers = [host[self._local] for h, host in enumerate(self.layout.hosts)
                     if h != self._host]  # fmt: skip
            message = (f"rank {self.rank} lost its all-reduce with rank(s) {peers} on other "
                       f"hosts: {str(error).splitlines()[0]}")  # fmt: skip
            self._post("CommTimeoutError", message)
            note = ("CommTimeoutError", message)
        return self._error_from(note)

    # --- failures ------------------------------------------------------------------------------

    def _group_ranks(self, message: str) -> str:
        """The ring's message with its host-local ranks written as ranks of the group."""
        local = self._local_ranks
        return re.sub(
            r"\brank (\d+)",
            lambda m: f"rank {local[int(m[1])]}" if int(m[1]) < len(local) else m[0],
            message,
        )

    def _post(self, kind: str, message: str) -> None:
        """Record the first failure of this object for every rank (later ones are kept out)."""
        self._failure = self._failure or message
        with self._store_lock:
            if self._left_store:  # closed: the last rank out may have deleted the key already
                return
            try:
                self._store.compare_set(f"{self._prefix}/failure", "", f"{kind}|{message}")
            except Exception as error:  # the store itself is gone: the local error still stands
                logger.warning("rank %d could not post its failure: %s", self.rank, error)

    def _leave_store(self) -> None:
        """This rank posts no failure any more; the last rank of the group to leave deletes the
        failure posted for all (the others may read it until they close)."""
        with self._store_lock:
            if self._left_store:
                return
            self._left_store = True
        try:
            if count_out(self._store, f"{self._prefix}/closed", self.world_size):
                self._store.delete_key(f"{self._prefix}/failure")
        except Exception as error:  # the store is gone: nothing is left in it either
            logger.warning("rank %d could not tell the store it closed: %s", self.rank, error)

    def _read_note(self, wait_s: float = 0.0) -> tuple[str, str] | None:
        key = f"{self._prefix}/failure"
        deadline = time.monotonic() + wait_s
        while True:
            try:
                if self._store.check([key]):
                    kind, _, message = self._store.get(key).decode().partition("|")
                    return kind, message
            except Exception:  # an unreachable store says nothing about the peers
                return None
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def _error_from(self, note: tuple[str, str]) -> CommError:
        kind, message = note
        self._failure = self._failure or message
        return _ERRORS.get(kind, CommTimeoutError)(f"rank {self.rank} stopped: {message}")

    def _result(self, future: Future[None], timeout: timedelta | None) -> None:
        """The call's result; a failure another rank posted meanwhile ends the wait early.

        Arguments:
            future: the call, on the worker.
            timeout: how long to wait (None: until the call ends, itself bounded); a wait that
                runs out raises `wait_ran_out`'s TimeoutError, the call going on.
        """
        deadline = None if timeout is None else time.monotonic() + timeout.total_seconds()
        while True:
            step = LIVENESS_PERIOD_S
            if deadline is not None:
                step = max(0.0, min(step, deadline - time.monotonic()))
            try:
                future.result(timeout=step)
                return
            except FutureTimeout:  # also the call's own CommTimeoutError (a subclass)
                succeeded = future.done() and future.exception() is None
                note = None if succeeded else self._read_note()
                if note is not None:
                    raise self._error_from(note) from None
                if future.done():
                    # Its own outcome: a success (it may end during the note's read, after
                    # this step's wait ran out), or its error with no note of it (an
                    # unreachable store).
                    future.result()
                    return
                if deadline is not None and time.monotonic() >= deadline:
                    assert timeout is not None
                    raise wait_ran_out(timeout) from None

    # --- lifetime ------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Finish queued calls (unless a failure left one waiting on a peer), then release the
        ring. Idempotent. The last rank of the group to close deletes the failure report kept
        in the store (a rank that never closes, e.g. one that died, leaves it)."""
        if self._closed:
            return
        self._closed = True
        if self._ring is not None:  # connected on every rank: each counts itself out
            self._leave_store()
        if self._executor is not None:
            self._executor.shutdown(wait=not self._failure)
        if self._last is not None and not self._last.done():
            # A failed call may still wait for a peer (bounded): the ring stays open meanwhile.
            logger.warning("rank %d leaves its host ring open: a failed call still waits for "
                           "a peer (bounded by the timeout)", self.rank)  # fmt: skip
            return
        if self._passes is not None:
            self._passes.buffer.close()
            self._passes.areas.close()
        if self._ring is not None:
            self._ring.close()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else (self._disabled and "off") or "open"
        return f"HierarchicalAllReduce({self.layout.describe()}, rank={self.rank}, {state})"
