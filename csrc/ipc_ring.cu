// The all-reduce of n GPUs (or n processes sharing a GPU) on one host through CUDA IPC (pure
// CUDA, no torch headers): the GPU counterpart of shm_ring.h. This file holds its kernels and
// the members of IpcRing that launch them; ipc_ring.h declares IpcRing for the host compiler
// (the torch glue, ipc_ring_glue.cpp).
//
// Every rank allocates one device buffer: a control block (barrier flags written by the peers,
// its own barrier counters, the peers' call headers, an abort word, the peers' abort notices)
// and two data areas of `chunk_bytes` each. The buffers are exchanged as cudaIpcMemHandle_t (by
// the Python layer, through the process group's store, once), so every rank loads and stores
// every rank's buffer.
//
// A call is ONE kernel of kBlocks blocks, with barriers inside it. For each chunk of the tensor:
//   one-shot (small calls):   copy the chunk in -> barrier -> every rank reads every peer's
//                             chunk and reduces all of it, in rank order, into its tensor;
//   two-shot (larger calls):  copy in -> barrier -> rank r reduces part r of the chunk (rank
//                             order) in place in its area -> barrier -> every rank gathers the
//                             n reduced parts into its tensor (reduce-scatter + all-gather).
// Results are bitwise identical on all ranks: each element is combined in rank order 0..n-1.
//
// Barriers are per block (block b of rank r meets block b of every peer only): thread p of the
// block stores the barrier's number into rank p's flag [b][r] with st.release.sys after the
// block's writes, then polls its own flag [b][p] with ld.acquire.sys. The numbers come from a
// per-block counter in device memory, advanced by the kernel itself, so a call captured in a
// CUDA graph meets fresh barriers on every replay. Every call launches all kBlocks blocks and
// every block passes every barrier, so the counters of all blocks and all ranks stay equal.
//
// Why two data areas suffice: chunks are numbered across calls (a per-block device counter) and
// chunk m uses area m % 2. Peers read a chunk's data only between its first barrier and the next
// chunk's first barrier. Within a call the element -> thread map depends only on the position in
// the chunk, so the block that overwrites a position for chunk m is the one whose peers read it
// for chunk m - 2, and it met them at chunk m - 1's first barrier. Across calls, a rank's kernel
// starts only after its previous one has ended (every peer's blocks had reached its last
// barrier), and a peer's kernel runs only after that peer's previous one has ended.
//
// Every poll is bounded by the timeout (%globaltimer) and also watches the peer's abort notice. A
// timeout, a peer that gave up, or different call headers (checked at a call's first barrier by
// every block, so all blocks of all ranks stop at the same barrier, before the tensor is
// written) sets this rank's abort word: later kernels return at once, and the host reads the
// report (host-mapped memory) after waiting for the call. The rank that sets it also posts it
// as a notice into every peer's control block (`notices[rank]`), so that a poll reads nothing
// but its own device's memory: a load from a peer's memory crosses NVLink or PCIe (about a
// microsecond), and it would be paid by every spin and, after the flag arrives, by every
// barrier. The report carries the failing call's number (IpcRing numbers the calls it
// enqueues), by which the host tells the calls that ended before the failure (succeeded) from
// those that returned at once after it (did not run).
//
// Dead peers. The host's watchdog (process.h's PeerWatchdog) checks the peers' pids while the
// ring is open and writes the dead rank into `DeviceFailure::dead_peer`, which lives in mapped
// pinned host memory: a plain host store that the spinning kernel's volatile loads see over the
// bus, with no CUDA call involved (a cudaMemcpyAsync into the device-memory abort word would
// also run beside the kernel on a non-blocking stream, but it needs the CUDA driver on a thread
// while another may sit in a synchronize, and on a GPU time-sliced between the ranks' processes
// it waits for this process's time slice; the mapped word needs nothing). Polls read it every
// kHostPollSpins spins only (a read across the bus costs about a microsecond). The kernel then
// fails naming the dead rank and sets this rank's abort word as for any failure, so the other
// ranks stop too; the report carries the call's number as for any failure.
//
// A late rank. A block stores its flag into every peer's control block before waiting, so a
// rank arriving after a peer gave up (timed out waiting for it) finds that peer's flag already
// there. After the flags arrived it therefore reads each peer's notice once more: a peer that
// gave up makes this rank fail too instead of returning a result the peer did not get. This
// closes the window except for a rank that arrives while the peer's notice is still in flight,
// within about a microsecond of that peer's timeout (exact agreement would need a
// compare-and-swap on the peer's memory, which PCIe peer links do not all support). Such a rank
// returns its call's result (every rank's data was in place: a flag follows its copy-in) and
// meets the failure at its next barrier, since the peer's kernels return at once from then on.
//
// Ranks sharing one GPU (processes, without MPS). The GPU runs one process's context at a time,
// switching at the end of a time slice (the figures below fit about 2.3 ms on an H200) or when the
// context has no work left. A kernel that waits in a barrier for a peer keeps its context busy, so
// each barrier costs about a slice per peer: measured 2.54 ms per call (2 ranks) and 7.3 ms (4
// ranks) at any size up to 256 KB, 36.5 and 109 ms at 64 MB (16 barriers). A kernel cannot give its
// slice away: only an idle context does, so yielding would mean ending the kernel at a barrier not
// yet met and having the host relaunch it once it has ended, a host round trip per barrier that a
// captured CUDA graph or an asynchronous call cannot make. The ring therefore leaves such ranks to
// gloo unless asked (comm/agreement.py). Under MPS their kernels run at once, so the barriers
// should not wait out slices there (not measured).
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "ipc_ring.h"
#include "reduce.h"
#include "reduce_kernels.cuh"
#include "ring.h"

namespace fastpar {
namespace cuda {

// Blocks of every call: tens, so that compute kernels keep most SMs while gradients travel.
// Fixed (not sized to the call) because the barrier counters need every block in every call.
constexpr int kBlocks = 24;
constexpr int kThreads = 512;
// One-shot reads n chunks per rank and two-shot 2 (n - 1) / n of one, with one more barrier:
// one-shot wins while latency dominates. Design values (from published measurements of
// one-shot/two-shot all-reduces over NVLink), not yet measured on this code.
constexpr int64_t kOneShotMaxBytesTwoRanks = 512 * 1024;
constexpr int64_t kOneShotMaxBytes = 256 * 1024;

// Spins of a barrier poll between two reads of the host-written `dead_peer`.
constexpr unsigned kHostPollSpins = 64;

// Start of every rank's buffer.
struct Control {
  uint64_t flags[kBlocks][kMaxRanks];  // [b][p]: the last barrier block b of rank p reached
  uint64_t passed[kBlocks];            // [b]: barriers this rank's block b has passed
  uint64_t chunks[kBlocks];            // [b]: chunks this rank's block b has handled
  CallHeader headers[2][kMaxRanks];    // [parity of a call's first barrier][p]: rank p's call
  uint32_t abort;  // set by this rank's own kernels only: 0, or 2 + the rank it blames (or 1)
  uint32_t notices[kMaxRanks];  // [p]: rank p's abort word, posted here by p when it set it
};
static_assert(sizeof(Control) <= kControlBytes, "control block too large");

// One call, as the kernel sees it.
struct CallArgs {
  RankPointers ranks;
  int rank;
  int world;
  char* data;          // the caller's tensor (any alignment of its element size)
  int64_t count;       // its elements
  int64_t chunk;       // elements per chunk (fits one data area)
  int data_align;      // 2, 4, 8 or 16: the largest power of two (<= 16) dividing `data`
  bool two_shot;
  bool average;        // AVG: divide the sum by `world`
  CallHeader header;
  uint64_t area_bytes;  // bytes of one data area
  uint64_t timeout_ns;
  int64_t call;  // this call's number, reported with a failure (IpcRing::calls_)
  DeviceFailure* failure;
};

__device__ __forceinline__ void store_release_sys(uint64_t* address, uint64_t value) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(address), "l"(value) : "memory");
}

__device__ __forceinline__ uint64_t load_acquire_sys(const uint64_t* address) {
  uint64_t value;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(value) : "l"(address) : "memory");
  return value;
}

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  return now;
}

// An abort word, or a peer's notice of its own (see Control).
__device__ __forceinline__ bool aborted(const uint32_t* abort) {
  return *static_cast<const volatile uint32_t*>(abort) != 0;
}

// The rank an aborted rank's abort word (or its notice) blames (-1: none).
__device__ __forceinline__ int blamed_by(const uint32_t* abort) {
  return static_cast<int>(*static_cast<const volatile uint32_t*>(abort)) - 2;
}

__device__ __forceinline__ Control* control_of(const CallArgs& a, int p) {
  return reinterpret_cast<Control*>(a.ranks.ptr[p]);
}

__device__ __forceinline__ char* area_of(const CallArgs& a, int p, uint64_t chunk_number) {
  return a.ranks.ptr[p] + kControlBytes + (chunk_number & 1) * a.area_bytes;
}

__device__ __forceinline__ int64_t min64(int64_t x, int64_t y) { return x < y ? x : y; }

// 16 bytes from/to `p`, in accesses as wide as `align` allows (never byte by byte).
// Every load bypasses L1 (ld.global.cg): the areas are written by other ranks, and a line of
// an earlier chunk must never be served from this SM's L1.
__device__ __forceinline__ uint4 load_pack(const char* p, int align) {
  if (align == 16) return __ldcg(reinterpret_cast<const uint4*>(p));
  if (align == 8) {
    const uint2* q = reinterpret_cast<const uint2*>(p);
    const uint2 a = __ldcg(q), b = __ldcg(q + 1);
    return make_uint4(a.x, a.y, b.x, b.y);
  }
  if (align == 4) {
    const unsigned int* q = reinterpret_cast<const unsigned int*>(p);
    return make_uint4(__ldcg(q), __ldcg(q + 1), __ldcg(q + 2), __ldcg(q + 3));
  }
  const unsigned short* q = reinterpret_cast<const unsigned short*>(p);
  uint4 v;
  v.x = __ldcg(q) | (static_cast<uint32_t>(__ldcg(q + 1)) << 16);
  v.y = __ldcg(q + 2) | (static_cast<uint32_t>(__ldcg(q + 3)) << 16);
  v.z = __ldcg(q + 4) | (static_cast<uint32_t>(__ldcg(q + 5)) << 16);
  v.w = __ldcg(q + 6) | (static_cast<uint32_t>(__ldcg(q + 7)) << 16);
  return v;
}

// One element, as load_pack: past L1.
template <typename T>
__device__ __forceinline__ T load_element(const char* p) {
  static_assert(sizeof(T) == 2 || sizeof(T) == 4 || sizeof(T) == 8, "2, 4 or 8-byte elements");
  T value;
  if constexpr (sizeof(T) == 2) {
    const unsigned short bits = __ldcg(reinterpret_cast<const unsigned short*>(p));
    memcpy(&value, &bits, sizeof(T));
  } else if constexpr (sizeof(T) == 4) {
    const unsigned int bits = __ldcg(reinterpret_cast<const unsigned int*>(p));
    memcpy(&value, &bits, sizeof(T));
  } else {
    const unsigned long long bits = __ldcg(reinterpret_cast<const unsigned long long*>(p));
    memcpy(&value, &bits, sizeof(T));
  }
  return value;
}

__device__ __forceinline__ void store_pack(char* p, int align, uint4 v) {
  if (align == 16) {
    *reinterpret_cast<uint4*>(p) = v;
  } else if (align == 8) {
    uint2* q = reinterpret_cast<uint2*>(p);
    q[0] = make_uint2(v.x, v.y);
    q[1] = make_uint2(v.z, v.w);
  } else if (align == 4) {
    uint32_t* q = reinterpret_cast<uint32_t*>(p);
    q[0] = v.x;
    q[1] = v.y;
    q[2] = v.z;
    q[3] = v.w;
  } else {
    uint16_t* q = reinterpret_cast<uint16_t*>(p);
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      q[2 * i] = static_cast<uint16_t>(words[i]);
      q[2 * i + 1] = static_cast<uint16_t>(words[i] >> 16);
    }
  }
}

// Copies the `valid` leading elements of a 16-byte pack (all of them when valid >= kPack).
template <typename T>
__device__ __forceinline__ void copy_pack(char* to, int to_align, const char* from,
                                          int from_align, int64_t valid) {
  constexpr int kPack = 16 / sizeof(T);
  if (valid >= kPack) {
    store_pack(to, to_align, load_pack(from, from_align));
  } else {
#pragma unroll 1
    for (int i = 0; i < static_cast<int>(valid); ++i)
      reinterpret_cast<T*>(to)[i] = load_element<T>(from + i * sizeof(T));
  }
}

// IEEE division even under --use_fast_math, so the quotient is the one torch computes.
__device__ __forceinline__ float divide_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double divide_rn(double a, double b) { return __ddiv_rn(a, b); }

// The pack at byte `offset` of every rank's area, combined in rank order 0..n-1.
template <typename T, typename Op>
__device__ __forceinline__ uint4 reduce_pack(const CallArgs& a, uint64_t chunk_number,
                                             int64_t offset) {
  using A = typename AccType<T>::type;
  constexpr int kPack = 16 / sizeof(T);
  union Pack {
    uint4 raw;
    T v[kPack];
  };
  A acc[kPack];
  Pack in;
  in.raw = __ldcg(reinterpret_cast<const uint4*>(area_of(a, 0, chunk_number) + offset));
#pragma unroll
  for (int i = 0; i < kPack; ++i) acc[i] = to_acc(in.v[i]);
  for (int p = 1; p < a.world; ++p) {
    in.raw = __ldcg(reinterpret_cast<const uint4*>(area_of(a, p, chunk_number) + offset));
#pragma unroll
    for (int i = 0; i < kPack; ++i) acc[i] = Op::apply(acc[i], to_acc(in.v[i]));
  }
  if constexpr (std::is_floating_point<A>::value) {  // AVG is refused for integers
    if (a.average) {
#pragma unroll
      for (int i = 0; i < kPack; ++i) acc[i] = divide_rn(acc[i], static_cast<A>(a.world));
    }
  }
  Pack out;
#pragma unroll
  for (int i = 0; i < kPack; ++i) out.v[i] = from_acc<T>(acc[i]);
  return out.raw;
}

// Block b meets block b of every peer at barrier number `barrier`; false when the call must end
// (this block stops; the report is written once per rank). At a call's first barrier, `first`,
// the call headers are exchanged and compared by every block.
__device__ __forceinline__ bool meet(const CallArgs& a, uint64_t barrier, bool first) {
  __shared__ int failed;  // 0, a kFailure* kind, or -1: another block of this rank failed
  __shared__ int culprit;
  __shared__ int blamed;   // peer aborted: whom that peer blamed
  __shared__ int gave_up;  // 1 + a peer whose flag arrived but which had given up meanwhile
  Control* own = control_of(a, a.rank);
  if (threadIdx.x == 0) {
    failed = 0;
    culprit = -1;
    blamed = -1;
    gave_up = 0;
  }
  __syncthreads();  // also: every write of this block so far precedes the releases below
  const int peer = threadIdx.x;
  const int b = blockIdx.x;
  if (peer < a.world && peer != a.rank) {
    Control* theirs = control_of(a, peer);
    if (first) theirs->headers[barrier & 1][a.rank] = a.header;
    store_release_sys(&theirs->flags[b][a.rank], barrier);
    const uint64_t start = global_timer_ns();
    unsigned spins = 0;
    bool arrived = false;
    for (;;) {
      if (load_acquire_sys(&own->flags[b][peer]) >= barrier) {
        arrived = true;
        break;
      }
      if (*static_cast<volatile int*>(&failed) != 0) break;
      if (aborted(&own->abort)) {
        atomicCAS(&failed, 0, -1);
        break;
      }
      if (aborted(&own->notices[peer])) {
        if (atomicCAS(&failed, 0, kFailurePeerAborted) == 0) {
          culprit = peer;
          blamed = blamed_by(&own->notices[peer]);
        }
        break;
      }
      if (global_timer_ns() - start > a.timeout_ns) {
        if (atomicCAS(&failed, 0, kFailureTimeout) == 0) culprit = peer;
        break;
      }
      if (++spins % kHostPollSpins == 0) {
        const int dead = *static_cast<const volatile int32_t*>(&a.failure->dead_peer);
        if (dead != 0) {
          if (atomicCAS(&failed, 0, kFailurePeerDead) == 0) culprit = dead - 1;
          break;
        }
      }
      __nanosleep(32);
    }
    // The peer's flag came, but it may have given up on this rank before (see the file comment).
    if (arrived && aborted(&own->notices[peer])) atomicCAS(&gave_up, 0, peer + 1);
  }
  __syncthreads();
  auto header_of = [&](int p) {
    if (p == a.rank) return a.header;
    const volatile CallHeader* stored = &own->headers[barrier & 1][p];
    return CallHeader{stored->count, stored->dtype, stored->op};
  };
  if (threadIdx.x == 0 && failed == 0 && first) {
    for (int p = 0; p < a.world; ++p) {
      const CallHeader call = header_of(p);
      if (call.count != a.header.count || call.dtype != a.header.dtype || call.op != a.header.op)
        failed = kFailureMismatch;
    }
  }
  if (threadIdx.x == 0 && failed == 0 && gave_up != 0) {  // a mismatch takes precedence
    failed = kFailurePeerAborted;
    culprit = gave_up - 1;
    blamed = blamed_by(&own->notices[culprit]);
  }
  __syncthreads();
  if (failed == 0) return true;
  // The first block of this rank to fail reports; the others just stop.
  // The abort word carries whom this rank blames, so that peers stopped by it name the cause.
  const int blame = failed == kFailurePeerAborted && blamed >= 0 ? blamed : culprit;
  if (threadIdx.x == 0 && failed > 0 &&
      atomicCAS(&own->abort, 0u, static_cast<uint32_t>(blame + 2)) == 0u) {
    // The peers poll their own memory: post the word there first, so that they stop soon.
    for (int p = 0; p < a.world; ++p) {
      if (p != a.rank) {
        *static_cast<volatile uint32_t*>(&control_of(a, p)->notices[a.rank]) =
            static_cast<uint32_t>(blame + 2);
      }
    }
    __threadfence_system();
    volatile DeviceFailure* report = a.failure;
    report->culprit = culprit;
    report->blamed = blamed;
    report->call = a.call;
    for (int p = 0; p < a.world; ++p) {
      const CallHeader call = header_of(p);
      report->headers[p].count = call.count;
      report->headers[p].dtype = call.dtype;
      report->headers[p].op = call.op;
    }
    // The rest before `kind`, at system scope: the host's acquire load of `kind`
    // (IpcRing::failure) then sees all of it, also on a weakly ordered CPU.
    __threadfence_system();
    report->kind = failed;
    __threadfence_system();
  }
  return false;
}

template <typename T, typename Op>
__global__ void __launch_bounds__(kThreads, 2) all_reduce_kernel(CallArgs a) {
  constexpr int64_t kPack = 16 / sizeof(T);
  Control* own = control_of(a, a.rank);
  if (aborted(&own->abort)) return;
  const int64_t threads = static_cast<int64_t>(kBlocks) * kThreads;
  const int64_t first_pack = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  uint64_t barrier = *static_cast<volatile uint64_t*>(&own->passed[blockIdx.x]);
  uint64_t chunk_number = *static_cast<volatile uint64_t*>(&own->chunks[blockIdx.x]);
  const int64_t chunks = a.count == 0 ? 1 : (a.count + a.chunk - 1) / a.chunk;
  // Two-shot: packs per rank's part, the same for every chunk of the call (so that the
  // position -> thread map never changes within a call; see the file comment).
  const int64_t call_packs = (min64(a.count, a.chunk) + kPack - 1) / kPack;
  const int64_t part_packs = (call_packs + a.world - 1) / a.world;
  for (int64_t c = 0; c < chunks; ++c, ++chunk_number) {
    const int64_t base = c * a.chunk;  // first element of the chunk
    const int64_t elements = min64(a.chunk, a.count - base);
    char* tensor = a.data + base * static_cast<int64_t>(sizeof(T));
    ++barrier;
    char* mine = area_of(a, a.rank, chunk_number);
    // Valid elements of the pack that starts at element e of the chunk.
    auto valid = [&](int64_t e) { return elements - e; };
    if (!a.two_shot) {
      const int64_t packs = (elements + kPack - 1) / kPack;
      for (int64_t p = first_pack; p < packs; p += threads)
        copy_pack<T>(mine + p * 16, 16, tensor + p * 16, a.data_align, valid(p * kPack));
      if (!meet(a, barrier, c == 0)) return;
      for (int64_t p = first_pack; p < packs; p += threads) {
        const int64_t e = p * kPack;
        const uint4 sum = reduce_pack<T, Op>(a, chunk_number, p * 16);
        if (valid(e) >= kPack) {
          store_pack(tensor + p * 16, a.data_align, sum);
        } else {
          copy_pack<T>(tensor + p * 16, a.data_align, reinterpret_cast<const char*>(&sum), 16,
                       valid(e));
        }
      }
      continue;
    }
    // Two-shot: pack j of part q is the chunk's pack q * part_packs + j; thread j owns it in
    // every part.
    for (int64_t j = first_pack; j < part_packs; j += threads) {
      for (int q = 0; q < a.world; ++q) {
        const int64_t p = q * part_packs + j;
        if (p * kPack < elements)
          copy_pack<T>(mine + p * 16, 16, tensor + p * 16, a.data_align, valid(p * kPack));
      }
    }
    if (!meet(a, barrier, c == 0)) return;
    for (int64_t j = first_pack; j < part_packs; j += threads) {
      const int64_t p = a.rank * part_packs + j;
      if (p * kPack < elements)
        *reinterpret_cast<uint4*>(mine + p * 16) = reduce_pack<T, Op>(a, chunk_number, p * 16);
    }
    ++barrier;
    if (!meet(a, barrier, false)) return;
    for (int64_t j = first_pack; j < part_packs; j += threads) {
      for (int q = 0; q < a.world; ++q) {
        const int64_t p = q * part_packs + j;
        if (p * kPack < elements)
          copy_pack<T>(tensor + p * 16, a.data_align, area_of(a, q, chunk_number) + p * 16, 16,
                       valid(p * kPack));
      }
    }
  }
  if (threadIdx.x == 0) {
    own->passed[blockIdx.x] = barrier;
    own->chunks[blockIdx.x] = chunk_number;
  }
}

template <typename T>
void launch_op(const CallArgs& args, ReduceOp op, cudaStream_t stream) {
  switch (op) {
    case ReduceOp::kSum:
      return all_reduce_kernel<T, SumOp><<<kBlocks, kThreads, 0, stream>>>(args);
    case ReduceOp::kProduct:
      return all_reduce_kernel<T, ProductOp><<<kBlocks, kThreads, 0, stream>>>(args);
    case ReduceOp::kMin:
      return all_reduce_kernel<T, MinOp><<<kBlocks, kThreads, 0, stream>>>(args);
    case ReduceOp::kMax:
      return all_reduce_kernel<T, MaxOp><<<kBlocks, kThreads, 0, stream>>>(args);
  }
  throw std::invalid_argument("unknown reduce op " + std::to_string(static_cast<int>(op)));
}

// Runs `launch`, which enqueues call number `call`, and checks it: what fails comes out as a
// LaunchError naming the call (the number is taken: the caller must know which).
template <typename Launch>
void launch_numbered(int64_t call, const char* what, Launch&& launch) {
  try {
    launch();
    check_cuda(cudaGetLastError(), what);
  } catch (const std::exception& error) {
    throw LaunchError(error.what(), call);
  }
}

// The members of IpcRing (ipc_ring.h) that launch the kernels.

int64_t IpcRing::all_reduce(void* data, int64_t count, DType dtype, int32_t op,
                            cudaStream_t stream) {
  if (!connected()) throw std::logic_error("the CUDA IPC all-reduce is not connected");
  const int64_t element_size = dtype_size(dtype);
  const int64_t bytes = count * element_size;
  const uintptr_t address = reinterpret_cast<uintptr_t>(data);
  const uintptr_t low_bit = address & (~address + 1);  // largest power of two dividing it
  CallArgs args{};
  args.ranks = ranks_;
  args.rank = rank_;
  args.world = world_;
  args.data = static_cast<char*>(data);
  args.count = count;
  args.chunk = chunk_bytes_ / element_size;
  args.data_align = static_cast<int>(address % 16 == 0 ? 16 : low_bit);
  args.two_shot =
      bytes > (world_ == 2 ? kOneShotMaxBytesTwoRanks : kOneShotMaxBytes) && world_ > 1;
  args.average = op == kOpAvg;
  args.header = CallHeader{count, static_cast<int32_t>(dtype), op};
  args.area_bytes = static_cast<uint64_t>(chunk_bytes_);
  args.timeout_ns = timeout_ns_;
  args.failure = failure_device_;
  const ReduceOp reduce_op = op == kOpAvg ? ReduceOp::kSum : static_cast<ReduceOp>(op);
  const std::lock_guard<std::mutex> lock(enqueue_mutex_);
  args.call = ++calls_;
  launch_numbered(args.call, "the all-reduce kernel launch", [&] {
    switch (dtype) {
      case DType::kFloat32: return launch_op<float>(args, reduce_op, stream);
      case DType::kFloat64: return launch_op<double>(args, reduce_op, stream);
      case DType::kFloat16: return launch_op<__half>(args, reduce_op, stream);
      case DType::kBFloat16: return launch_op<__nv_bfloat16>(args, reduce_op, stream);
      case DType::kInt32: return launch_op<int32_t>(args, reduce_op, stream);
      case DType::kInt64: return launch_op<int64_t>(args, reduce_op, stream);
    }
  });
  return args.call;
}

int64_t IpcRing::agree(const CallHeader& header, cudaStream_t stream) {
  if (!connected()) throw std::logic_error("the CUDA IPC all-reduce is not connected");
  CallArgs args{};
  args.ranks = ranks_;
  args.rank = rank_;
  args.world = world_;
  args.chunk = chunk_bytes_ / static_cast<int64_t>(sizeof(int32_t));
  args.data_align = 16;
  args.header = header;
  args.area_bytes = static_cast<uint64_t>(chunk_bytes_);
  args.timeout_ns = timeout_ns_;
  args.failure = failure_device_;
  const std::lock_guard<std::mutex> lock(enqueue_mutex_);
  args.call = ++calls_;
  launch_numbered(args.call, "the agreement kernel launch",
                  [&] { launch_op<int32_t>(args, ReduceOp::kSum, stream); });
  return args.call;
}

}  // namespace cuda
}  // namespace fastpar
