"""`RingAllReduce`: the native all-reduce of one process group, with torch.distributed's shape.

The object owns the transport's buffers (`close()`, or use it as a context manager), answers
`should_use(tensor)`, and hands every call it does not handle to torch.distributed (the reason
logged once). Every element is combined in rank order, so all ranks get bitwise-identical
results. Transports:
- CPU tensors: one POSIX shared-memory segment for the group (`csrc/shm_ring.h`); a call returns
  when the result is in the tensor, and errors are raised by the call that meets them.
- CUDA tensors (where the native extension has CUDA, and every rank can map every peer's device
  memory: the same GPU, or peer access between the GPUs, agreed by all ranks): every rank's
  device buffer is mapped by the others through CUDA IPC (`csrc/ipc_ring.cu`). A call is one
  kernel on the ring's own stream, ordered after the caller's current stream; a synchronous call
  returns once the result is in the tensor, and `Work.wait()` of an asynchronous one blocks
  until it is: both raise what the device found (a peer that timed out, named; a mismatch), so
  nobody uses a tensor the ring did not reduce. A thread of the native ring watches the peers'
  pids while the ring is open: a peer whose process is gone makes the spinning kernels stop
  within about 0.1 s, naming it. Above CUDA_RING_MAX_BYTES, calls between different GPUs go to
  torch.distributed (NCCL), announced through the ring as on CPU. Ranks that share a GPU are
  left to gloo unless `serve_shared_gpu=True`: processes time-slice a GPU, and the ring's
  barriers wait out the slices (about 5x slower than gloo, measured). Closing is collective
  (every rank stops, then unmaps the peers' buffers, then frees its own).

Creating it is collective: every rank of the group creates its RingAllReduce objects in the same
order (as with process groups), and the ranks meet once through the default store to name and
map the segment, which is unlinked as soon as all have mapped it. After that a call touches
neither the store nor the allocator.
"""

from __future__ import annotations

import copy
import os
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from types import TracebackType

import torch
import torch.distributed as dist

from fastpar import _native
from fastpar._checks import check_int, check_member, check_timeout
from fastpar._logging import get_logger, log_once
from fastpar._native_types import IpcAllReduce, NativeModule, ShmAllReduce
from fastpar.comm import processes
from fastpar.comm.agreement import cuda_peer_problem, local_device_ids, shared_gpu_problem
from fastpar.comm.errors import (
    CommClosedError,
    CommError,
    CommMismatchError,
    FirstFailure,
    native_error_types,
    translate_native_error,
)
from fastpar.comm.exchange import StoreExchange
from fastpar.comm.fallback import dense, torch_all_reduce
from fastpar.comm.hosts import host_identity
from fastpar.comm.ops import AVG, ring_op_code, torch_op_code, unsupported_reason
from fastpar.comm.reduce import SUPPORTED_DTYPES
from fastpar.comm.shared_area import SharedMemoryUnavailableError, allocate_symmetric
from fastpar.comm.store_waits import CREATING_A_RING, count_out, wait_for_ranks
from fastpar.comm.timeouts import group_timeout
from fastpar.comm.work import CopyBackWork, CudaRingWork, RingWork

logger = get_logger(__name__)

DEFAULT_CHUNK_BYTES = {"cpu": 256 * 1024, "cuda": 8 * 1024 * 1024}
DEFAULT_SLOTS = 4
# Calls between different GPUs larger than this go to torch.distributed (NCCL): a design value
# (one-shot/two-shot all-reduces over P2P beat NCCL up to a few MiB in published figures of
# custom all-reduces; NCCL's ring bandwidth wins above), not measured on this code yet. Ranks
# sharing a GPU use the ring only on request, or where NCCL (which refuses them) is the group's
# CUDA backend: see agreement.SHARED_GPU_REASON.
CUDA_RING_MAX_BYTES = 8 * 1024 * 1024
_SUM = dist.ReduceOp.SUM


def _cuda_backend_name(group: dist.ProcessGroup) -> str:
    """The name of `group`'s torch.distributed backend for CUDA tensors ("gloo", "nccl"); ""
    when it has none."""
    try:
        return str(group._get_backend(torch.device("cuda")).name())
    except (AttributeError, RuntimeError, ValueError):
        return ""


class RingAllReduce:
    """All-reduce over the ranks of `group` through fastpar's native ring.

    Arguments:
        group: the process group (None: the default group). This process must be a member.
        timeout: how long any wait for a peer may take (timedelta or seconds; None: the
            group's own timeout, as given to `init_process_group` or `new_group`); a peer that
            is absent or hung makes every rank raise CommTimeoutError within twice this, one
            whose process is gone within about a second.
        device: the device whose tensors this ring reduces ("cpu", or a CUDA device: this
            rank's GPU); tensors elsewhere go to torch.distributed.
        chunk_bytes: bytes per pipeline chunk, a multiple of 4096 (None: 256 KiB on CPU,
            8 MiB on CUDA, where each rank's IPC buffer holds two chunks).
        slots: CPU chunks in flight per rank (>= 3); the segment holds
            world * slots * chunk_bytes, plus about 8 MiB of windows for small calls
            (`csrc/shm_ring.h`).
        serve_shared_gpu: CUDA: serve ranks that share a GPU even where torch.distributed can
            (gloo). Off by default: processes time-slice a GPU, which makes every call of the
            ring wait out slices, about 5x slower than gloo (agreement.SHARED_GPU_REASON); on
            for comm="ring", and under MPS, where the ranks' kernels run at once.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        *,
        timeout: timedelta | float | None = None,
        device: torch.device | str = "cpu",
        chunk_bytes: int | None = None,
        slots: int = DEFAULT_SLOTS,
        serve_shared_gpu: bool = False,
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "RingAllReduce needs torch.distributed to be initialised "
                "(call torch.distributed.init_process_group first)"
            )
        self.group: dist.ProcessGroup = group if group is not None else dist.group.WORLD
        self.rank = check_member(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.timeout = (
            group_timeout(self.group, self.device)
            if timeout is None
            else check_timeout("timeout", timeout)
        )
        self._transport: ShmAllReduce | IpcAllReduce | None = None
        self._native_errors: tuple[type[BaseException], ...] = ()
        self._disabled: str | None = None
        self._closed = False
        self._executor: ThreadPoolExecutor | None = None
        self._last: Future[None] | None = None
        self._submit_lock = threading.Lock()
        self._stream: torch.cuda.ExternalStream | None = None
        self._single_device = True  # CUDA: every rank on one GPU (then NCCL cannot serve)
        self._captured = False  # CUDA: a call was captured in a graph (replayed on other streams)
        self._device_failure: FirstFailure | None = None  # CUDA: what the device reported
        self._store: dist.Store | None = None
        self._prefix = ""
        self._peer_pids: dict[int, int] = {}  # the peers whose liveness setup waits check
        self._serve_shared_gpu = bool(serve_shared_gpu)
        self._shared_areas: list[tuple[int, int]] = []  # (address, bytes) of this rank's areas
        # The shared-memory transport while the ring is open and serves CPU tensors: the
        # common call goes straight to it (see all_reduce).
        self._cpu_transport: ShmAllReduce | None = None
        if self.device.type not in ("cpu", "cuda"):
            self._disabled = f"the ring handles CPU and CUDA tensors, not {self.device.type}"
        elif self.world_size > 1:
            if chunk_bytes is None:
                chunk_bytes = DEFAULT_CHUNK_BYTES[self.device.type]
            self._connect(chunk_bytes, slots)
        if self._disabled is not None:
            log_once(logger, f"fastpar ring all-reduce is off for this group: {self._disabled}")
        elif self._stream is None and self._transport is not None:
            self._cpu_transport = self._transport

    # --- setup ---------------------------------------------------------------------------------

    def _store_wait(
        self, store: dist.Store, keys: dict[int, str], what: str, during: str = CREATING_A_RING
    ) -> None:
        wait_for_ranks(store, keys, self.timeout, self.rank, what, self._peer_pids, during=during)

    def _connect(self, chunk_bytes: int, slots: int) -> None:
        store = dist.distributed_c10d._get_default_store()
        setup = StoreExchange(store, self.rank, self.world_size, self.timeout,
                              during=CREATING_A_RING)  # fmt: skip
        with setup:  # every rank through the setup, whatever its end: its keys are deleted
            self._connect_through(setup, chunk_bytes, slots)

    def _connect_through(self, setup: StoreExchange, chunk_bytes: int, slots: int) -> None:
        mine = f"{host_identity()}\n{processes.identity()}"
        posted = setup.begin("ring", self.group, mine.encode(), "say which host it runs on")
        self._store, self._prefix = setup.store, setup.prefix
        hosts, pids = zip(*(record.decode().rsplit("\n", 1) for record in posted), strict=True)
        by_host: dict[str, list[int]] = {}
        for rank in range(self.world_size):
            by_host.setdefault(hosts[rank], []).append(rank)
        if len(by_host) != 1:
            self._disabled = (
                f"its ranks are on {len(by_host)} hosts "
                f"({', '.join(map(str, by_host.values()))}), which share no memory; "
                "fastpar.comm.create_all_reduce picks the hierarchical all-reduce for such groups"
            )
            return
        self._peer_pids = processes.watchable_pids(
            {rank: pid for rank, pid in enumerate(pids) if rank != self.rank}
        )
        setup.pids = self._peer_pids
        native = _native.load()
        self._native_errors = native_error_types(native)
        if self.device.type == "cuda":
            self._connect_cuda_ipc(native, setup, chunk_bytes)
        else:
            self._connect_shared_memory(native, setup, chunk_bytes, slots)

    def _agree(self, setup: StoreExchange, question: str, problem: str, what: str) -> bool:
        """All ranks' verdicts on `question`; False (the ring off, the reason kept) when any
        rank has a problem."""
        reason = setup.agree(question, problem, what)
        if reason is not None:
            self._disabled = reason
        return reason is None

    def _connect_cuda_ipc(
        self, native: NativeModule, setup: StoreExchange, chunk_bytes: int
    ) -> None:
        problem = "" if native.with_cuda else "fastpar's native extension was built without CUDA"
        if not problem:
            local_ids = local_device_ids()
            posted = setup.gather("device", local_ids[self.device.index], "say which GPU it uses")
            device_ids = [device_id.decode() for device_id in posted]
            self._single_device = len(set(device_ids)) == 1
            problem = cuda_peer_problem(self.rank, device_ids, local_ids) or shared_gpu_problem(
                device_ids, self._serve_shared_gpu, _cuda_backend_name(self.group)
            )
        if not self._agree(
            setup, "peer-access", problem, "say whether it can map every peer's GPU"
        ):
            return
        transport = native.IpcAllReduce(
            rank=self.rank, world=self.world_size, device=self.device.index,
            chunk_bytes=chunk_bytes, timeout_s=self.timeout.total_seconds(),
        )  # fmt: skip
        try:
            # The handle, then this rank's chunk_bytes: a peer maps this buffer as two areas of
            # its own chunk_bytes, so a larger one would read past its end.
            shared = bytes(transport.handle().tolist()) + int(chunk_bytes).to_bytes(8, "little")
            values = setup.gather("ipc", shared, "share its CUDA IPC handle")
            chunks = [int.from_bytes(value[-8:], "little") for value in values]
            if len(set(chunks)) > 1:  # every rank reads the same values: all raise
                raise ValueError(f"chunk_bytes must be the same on every rank, got {chunks} "
                                 "(by rank)")  # fmt: skip
            handles = [torch.frombuffer(bytearray(value[:-8]), dtype=torch.uint8)
                       for value in values]  # fmt: skip
            try:
                transport.connect(handles)
                problem = ""
            except RuntimeError as error:
                problem = f"mapping the peers' buffers failed: {error}"
            if not self._agree(setup, "mapped", problem, "map the peers' CUDA buffers"):
                transport.close()  # nobody runs a kernel on these buffers: a local close is safe
                return
            transport.watch_peers([self._peer_pids.get(r, 0) for r in range(self.world_size)])
        except BaseException:
            transport.close()
            raise
        self._transport = transport
        self._stream = torch.cuda.ExternalStream(transport.stream_handle, device=self.device)
        self._device_failure = FirstFailure(
            transport.check, self._native_errors, lambda: transport.failed_call
        )

    def _connect_shared_memory(
        self, native: NativeModule, setup: StoreExchange, chunk_bytes: int, slots: int
    ) -> None:
        store = setup.store
        # The name is published before the segment exists, so that whoever meets a failure
        # (a creator that died before the others mapped it) can remove it.
        name_key, segment_key = setup.key("segment-name"), setup.key("segment")
        timeout_s = self.timeout.total_seconds()
        transport = None
        failure: Exception | None = None  # this rank's mapping's, once every rank has read it
        try:
            if self.rank == 0:
                # The creator's pid in the name says whose segment it is (tests look for it).
                name = f"/fastpar-{os.getpid()}-{uuid.uuid4().hex[:16]}"
                setup.post("segment-name", name)
                try:
                    transport = native.ShmAllReduce(
                        name=name, create=True, rank=0, world=self.world_size, slots=slots,
                        chunk_bytes=chunk_bytes, timeout_s=timeout_s,
                    )  # fmt: skip
                except Exception as error:
                    setup.post("segment", f"error: {error}")
                    raise
                setup.post("segment", name)
            else:
                setup.wait({0: segment_key}, "create the shared memory segment")
                name = store.get(segment_key).decode()
                if name.startswith("error: "):
                    raise RuntimeError(f"rank 0 could not create the ring's segment: {name[7:]}")
                try:
                    transport = native.ShmAllReduce(
                        name=name, create=False, rank=self.rank, world=self.world_size,
                        slots=slots, chunk_bytes=chunk_bytes, timeout_s=timeout_s,
                    )  # fmt: skip
                except Exception as error:
                    failure = error  # told through the stage, so every rank reads it
            mine = "ok" if failure is None else f"error: {failure}"
            mapped = setup.gather("mapped", mine, "map the shared memory segment")
            if failure is not None:
                raise failure
            for rank, posted in enumerate(mapped):
                value = posted.decode()
                if value != "ok":
                    raise RuntimeError(f"rank {rank} could not map the ring's segment: "
                                       f"{value.removeprefix('error: ')}")  # fmt: skip
            # Everyone has it mapped: from now on a crash leaves nothing in /dev/shm.
            transport.unlink()
        except BaseException:
            if transport is not None:
                transport.close()
            if store.check([name_key]):  # nobody uses a segment whose setup failed
                native.remove_shared_segment(store.get(name_key).decode())
            raise
        self._transport = transport

    # --- shared memory -------------------------------------------------------------------------

    def empty_shared(self, size: int, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A tensor in memory that every rank of the group maps (collective: every rank
        allocates the same sizes in the same order, as with `new_group`).

        `all_reduce` of a contiguous tensor inside it (all of it or any slice, the same on every
        rank) copies nothing in or out when it spans 8 chunks or more (2 MiB by default;
        smaller calls copy as usual, which is faster where the data fits the caches): each
        rank reduces its part straight from every rank's memory into its own, then copies the
        other parts from their owners; it returns once no peer reads this rank's memory any
        more, so the tensor may be written again. The memory
        is released once the tensor (and every view of it) is gone and the ring is closed.

        Arguments:
            size: number of elements (>= 0).
            dtype: the element type.

        Returns:
            A zero-filled 1-D CPU tensor of `size` elements.

        Raises:
            SharedMemoryUnavailableError: on every rank, when some rank cannot allocate or map
                its part (/dev/shm too small: the message shows its free space), or this ring
                does not serve the group (ranks on several hosts; CUDA, not implemented yet).
            CommMismatchError: on every rank, when ranks ask for different sizes or dtypes.
            CommTimeoutError: a peer did not take part within the timeout.
        """
        check_int("size", size, 0)
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
        if self._closed:
            raise CommClosedError("this RingAllReduce was closed")
        if self.world_size == 1:  # no peer reads it: ordinary memory is shared with everyone
            return torch.zeros(size, dtype=dtype, device=self.device)
        if self._disabled is not None:
            raise SharedMemoryUnavailableError(f"the ring is off for this group: {self._disabled}")
        if self._stream is not None:
            raise SharedMemoryUnavailableError("shared areas serve CPU tensors only so far")
        assert self._store is not None and self._transport is not None
        areas = allocate_symmetric(
            self._store, "area", self.group, numel=size, dtype=dtype, timeout=self.timeout,
            pids=self._peer_pids,
        )  # fmt: skip
        try:
            self._transport.register_area(areas)
        except self._native_errors as error:
            raise translate_native_error(error) from None
        mine = areas[self.rank]
        self._shared_areas.append((mine.data_ptr(), mine.numel()))
        return mine[: size * dtype.itemsize].view(dtype)

    def in_shared_area(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor`'s elements lie in memory from this ring's `empty_shared`."""
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        return tensor.device.type == "cpu" and any(
            address <= start and end <= address + nbytes for address, nbytes in self._shared_areas
        )

    # --- calls ---------------------------------------------------------------------------------

    def should_use(self, tensor: torch.Tensor, op: object = dist.ReduceOp.SUM) -> bool:
        """Whether `all_reduce(tensor, op)` runs on the ring (False: it goes to torch.distributed).

        Arguments:
            tensor: the tensor that would be reduced.
            op: the reduce operation.

        Returns:
            True when the ring is open and handles this device, dtype and op.
        """
        if self._closed or not isinstance(tensor, torch.Tensor):
            return False
        return self._fallback_reason(tensor, ring_op_code(op), op) is None

    def fallback_reason(self, tensor: torch.Tensor, op: object = dist.ReduceOp.SUM) -> str | None:
        """Why `all_reduce(tensor, op)` would go to torch.distributed; None when the ring runs
        it."""
        if self._closed:
            return "this RingAllReduce was closed"
        return self._fallback_reason(tensor, ring_op_code(op), op)

    def _fallback_reason(self, tensor: torch.Tensor, code: int | None, op: object) -> str | None:
        if tensor.device != self.device:
            return f"tensor is on {tensor.device}; this ring serves {self.device}"
        if self._disabled is not None:
            return self._disabled
        if (
            self._stream is not None
            and not self._single_device
            and tensor.numel() * tensor.element_size() > CUDA_RING_MAX_BYTES
        ):
            return f"calls of more than {CUDA_RING_MAX_BYTES} bytes between GPUs go to NCCL"
        return unsupported_reason(tensor.dtype, code, op)

    def all_reduce(
        self,
        tensor: torch.Tensor,
        op: object = dist.ReduceOp.SUM,
        group: dist.ProcessGroup | None = None,
        async_op: bool = False,
    ) -> RingWork | CudaRingWork | CopyBackWork | dist.Work | None:
        """In place: `tensor` becomes the reduction of every rank's `tensor`, as
        `torch.distributed.all_reduce` does.

        Arguments:
            tensor: any shape and size (0 included); contiguous, or a non-overlapping view
                (reduced through a contiguous copy, here and on torch.distributed alike, so
                elements outside the view are never touched). dtypes float32, float64, float16,
                bfloat16 (accumulated in float32), int32, int64.
            op: `torch.distributed.ReduceOp` SUM, AVG (floating dtypes), PRODUCT, MIN or MAX.
            group: None or this ring's group.
            async_op: return a work handle instead of waiting.

        Returns:
            None, or with `async_op` a handle with `wait()` and `is_completed()`.

        Raises:
            CommMismatchError: ranks passed different sizes, dtypes or ops (on every rank).
            CommTimeoutError: a peer did not arrive within the timeout (the ring is unusable,
                and chunks of `tensor` may hold reduced values while others do not).
            CommClosedError: the ring was closed or had failed before.
            On CUDA the first two are found by the device and raised when the call is waited
            for (its return, or `wait()` of its work); inside a CUDA graph capture, by the next
            call outside it.

        A captured call runs on the stream that replays its graph, not on the ring's: two
        kernels of one ring must never run at once (they share its barrier counters), so wait()
        for asynchronous calls before a replay, and make calls after a replay on the replaying
        stream (or once it has finished).
        """
        # The common call, a synchronous SUM of a contiguous CPU tensor with no call queued
        # before it, goes straight to the native ring: the general checks below took about as
        # long as the native call of a 1 KiB tensor (1.4 of 4.6 us, 2 ranks).
        transport = self._cpu_transport
        if (
            transport is not None
            and op is _SUM
            and group is None
            and not async_op
            and type(tensor) is torch.Tensor
            and tensor.is_cpu
            and tensor.dtype in SUPPORTED_DTYPES
            and tensor.is_contiguous()
            and (self._last is None or self._last.done())
        ):
            self._native_all_reduce(transport, tensor, 0)
            return None
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
        if group is not None and group is not self.group:
            raise ValueError("group must be None or the group this RingAllReduce was created for")
        if self._closed:
            raise CommClosedError("this RingAllReduce was closed")
        code = ring_op_code(op)
        reason = self._fallback_reason(tensor, code, op)
        if reason is not None:
            log_once(logger, f"fastpar all_reduce goes to torch.distributed: {reason}")
            self._announce_torch_path(tensor, op, reason)
            return torch_all_reduce(tensor, op, self.group, async_op)
        if code == AVG and not tensor.is_floating_point():
            raise ValueError(f"op AVG needs a floating-point tensor, got {tensor.dtype}")
        if self._stream is not None:
            return self._run_cuda(tensor, code, async_op)
        if async_op:
            return self._submit(tensor, code)
        last = self._last
        if last is not None and not last.done():
            self._submit(tensor, code).wait()  # after the async calls still queued, in order
        else:
            self._run(tensor, code)
        return None

    def _announce_torch_path(self, tensor: torch.Tensor, op: object, reason: str) -> None:
        """Tell the peers through the ring that this call goes to torch.distributed, so that a
        rank whose call would take the ring instead (another dtype, size or op) and this one
        both raise CommMismatchError saying so, instead of each waiting for the other in a
        different place until both time out. On CUDA a kernel on the ring's stream meets the
        peers' calls and the host waits for it (except inside a CUDA graph capture)."""
        if self._transport is None:
            return
        transport = self._transport

        def announce() -> None:
            if self._device_failure is None:  # CPU
                transport.agree_torch_path(tensor, torch_op_code(op))
            else:
                self._device_failure.call(transport.agree_torch_path, tensor, torch_op_code(op))

        try:
            self._in_order(announce)  # on CUDA nothing is queued: the ring's stream orders it
        except CommMismatchError as error:
            raise CommMismatchError(f"{error}; on rank {self.rank}: {reason}") from None

    def _in_order(self, call: Callable[[], None]) -> None:
        """Run `call` after the asynchronous calls still queued, translating native errors."""

        def translated() -> None:
            try:
                call()
            except self._native_errors as error:
                raise self._translate(error) from None

        last = self._last
        if last is None or last.done():
            translated()
            return
        with self._submit_lock:
            assert self._executor is not None
            future = self._executor.submit(translated)
            self._last = future
        future.result()

    def _run_cuda(self, tensor: torch.Tensor, code: int, async_op: bool) -> CudaRingWork | None:
        target = dense(tensor)
        # Whether the ring's device's current stream (the one the native call looks at) is
        # capturing; switching devices costs microseconds of host time, so only when needed.
        if torch.cuda.current_device() == self.device.index:
            capturing = torch.cuda.is_current_stream_capturing()
        else:
            with torch.cuda.device(self.device):
                capturing = torch.cuda.is_current_stream_capturing()
        assert self._device_failure is not None
        try:
            # The call's number, which the device reports with a failure (CudaRingWork).
            call = self._device_failure.call(
                self._transport.all_reduce, target, code, block_current_stream=not async_op
            )
        except self._native_errors as error:
            raise self._translate(error) from None
        reported_failure = self._device_failure.read_call_failure
        if capturing:
            # Captured in a CUDA graph: the kernel runs on the capturing stream, and the host
            # cannot wait; the device's verdict is raised by the next call outside the graph.
            self._captured = True
            work = CudaRingWork(None, self.device, tensor, target, call, reported_failure)
        else:
            event = torch.cuda.Event()
            event.record(self._stream)
            work = CudaRingWork(event, self.device, tensor, target, call, reported_failure)
        if async_op:
            return work
        work.wait()
        return None

    def check(self) -> None:
        """Raise the first failure the device reported about earlier CUDA calls, the same error
        each time, also after close() (a no-op on CPU, whose calls raise their own errors).
        Does not wait for the device."""
        failure = None if self._device_failure is None else self._device_failure.read()
        if failure is not None:
            raise copy.copy(failure)  # a fresh traceback for each raise

    def _translate(self, error: BaseException) -> CommError:
        """The fastpar error for the native ring's `error`; on CUDA a failure the device
        reported is kept as the ring's first (the native ring reports it once)."""
        translated = translate_native_error(error)
        if self._device_failure is not None:
            self._device_failure.keep(translated)
        return translated

    def _run(self, tensor: torch.Tensor, code: int) -> None:
        if self.world_size == 1:
            return
        target = dense(tensor)
        self._native_all_reduce(self._transport, target, code)
        if code == AVG or target is not tensor:
            with torch.no_grad():  # as in torch.distributed, autograd does not see the update
                if code == AVG:
                    target.div_(self.world_size)
                if target is not tensor:
                    tensor.copy_(target)

    def _native_all_reduce(self, transport: ShmAllReduce, tensor: torch.Tensor, code: int) -> None:
        try:
            transport.all_reduce(tensor, code)
        except self._native_errors as error:
            raise translate_native_error(error) from None

    def _submit(self, tensor: torch.Tensor, code: int) -> RingWork:
        with self._submit_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="fastpar-ring")
            future = self._executor.submit(self._run, tensor, code)
            self._last = future
        return RingWork(future, tensor)

    # --- lifetime ------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether close() was called."""
        return self._closed

    @property
    def failure(self) -> str:
        """Why the ring is unusable after a failed call ("" while it is usable)."""
        return self._transport.failure if self._transport is not None else ""

    def close(self) -> None:
        """Finish queued calls, then release the buffers. Idempotent; later calls raise
        CommClosedError.

        On CPU it is local. On CUDA it is collective, as creation is: this rank stops using the
        buffers and unmaps the peers', then frees its own once every rank has unmapped it (a
        buffer a peer may still map is never freed: if a peer does not get there within the
        timeout, this rank's buffer is left allocated until the process ends, and that is
        logged). Once `destroy_process_group` has destroyed the group, it waits for no peer (they
        may have closed theirs already, or never will): the buffer is freed only where every
        peer has unmapped it already. Where a call of this ring was captured in a CUDA graph, it
        first waits for the device (the graph's replays), and the graph must not be replayed
        afterwards.
        """
        if self._closed:
            return
        self._closed = True
        self._cpu_transport = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)  # each queued call is bounded by the timeout
        if self._transport is None:
            return
        if self._stream is None:
            self._transport.close()
            return
        if self._captured:
            # Replays of captured calls run on the replaying streams, which stop() does not
            # wait for: none may still read a buffer once the peers unmap and free it.
            torch.cuda.synchronize(self.device)
        # The device's last word, once every call has finished (bounded by the timeout), is
        # read before stop(), after which the native ring says only "closed": a call first asked
        # about after close() still gets its own outcome.
        self._stream.synchronize()
        assert self._device_failure is not None
        self._device_failure.read_last()
        self._transport.stop()  # own stream finished, the peers' buffers unmapped
        keys = {rank: f"{self._prefix}/unmapped/{rank}" for rank in range(self.world_size)}
        group_alive = self.group in dist.distributed_c10d._world.pg_map
        try:
            assert self._store is not None
            self._store.set(keys[self.rank], "1")
            if group_alive:
                self._store_wait(
                    self._store, keys, "unmap this rank's buffer", "closing a RingAllReduce"
                )
                unmapped = True
            else:  # nobody may come to the close of a destroyed group
                unmapped = self._store.check(list(keys.values()))
            if unmapped:
                self._last_reader_deletes(keys)
        except Exception as error:  # a dead peer or store: keep the buffer
            logger.warning("rank %d keeps its CUDA ring buffer allocated: %s", self.rank, error)
            return
        if not unmapped:
            logger.warning("rank %d keeps its CUDA ring buffer allocated: its group was destroyed "
                           "before every peer had unmapped it", self.rank)  # fmt: skip
            return
        self._transport.free()

    def _last_reader_deletes(self, keys: dict[int, str]) -> None:
        """This rank has read every key of `keys`: the last rank to get there deletes them (a
        rank that never does, e.g. a dead one, leaves them)."""
        assert self._store is not None
        if count_out(self._store, f"{self._prefix}/unmapped/read", self.world_size):
            for key in keys.values():
                self._store.delete_key(key)

    def __enter__(self) -> RingAllReduce:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else (self._disabled and "off") or "open"
        return (
            f"RingAllReduce(rank={self.rank}, world_size={self.world_size}, "
            f"device={self.device}, {state})"
        )
