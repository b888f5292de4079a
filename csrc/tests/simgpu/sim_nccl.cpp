#include "sim_nccl.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <map>
#include <set>
#include <mutex>
#include <optional>
#include <pthread.h>
#include <stdexcept>
#include <thread>
#include <tuple>
#include <type_traits>
#include <unordered_map>

namespace pycomm::sim {

namespace {

using Clock = std::chrono::steady_clock;

std::atomic<uint64_t> nextInstanceSerial{1};
std::atomic<uint64_t> nextUniqueId{1};
std::atomic<uint64_t> nextCommId{1};

enum class Kind { AllGather, ReduceScatter, AllReduce, Broadcast, Reduce, Send, Recv };

bool isPointToPoint(Kind kind) {
  return kind == Kind::Send || kind == Kind::Recv;
}

const char* labelOf(Kind kind) {
  switch (kind) {
    case Kind::AllGather: return "allgather";
    case Kind::ReduceScatter: return "reducescatter";
    case Kind::AllReduce: return "allreduce";
    case Kind::Broadcast: return "broadcast";
    case Kind::Reduce: return "reduce";
    case Kind::Send: return "send";
    case Kind::Recv: return "recv";
  }
  return "?";
}

enum class Red { None, Sum, Prod, Max, Min, Avg, PreMulSum };

const char* labelOf(Red red) {
  switch (red) {
    case Red::None: return "-";
    case Red::Sum: return "sum";
    case Red::Prod: return "prod";
    case Red::Max: return "max";
    case Red::Min: return "min";
    case Red::Avg: return "avg";
    case Red::PreMulSum: return "premulsum";
  }
  return "?";
}

size_t elementSize(ncclDataType_t type) {
  switch (type) {
    case ncclInt8:
    case ncclUint8:
    case ncclFloat8e4m3:
    case ncclFloat8e5m2:
      return 1;
    case ncclFloat16:
    case ncclBfloat16:
      return 2;
    case ncclInt32:
    case ncclUint32:
    case ncclFloat32:
      return 4;
    case ncclInt64:
    case ncclUint64:
    case ncclFloat64:
      return 8;
    default:
      return 0;
  }
}

bool isFp8(ncclDataType_t type) {
  return type == ncclFloat8e4m3 || type == ncclFloat8e5m2;
}

// One collective call as the kernel needs it. A premul-sum scalar is kept
// by value (host-immediate, read at the call) or by address (device
// residence: host memory stands for device memory, read by the kernel).
struct Op {
  Kind kind = Kind::AllGather;
  const void* input = nullptr;
  void* output = nullptr;
  size_t count = 0; // per rank for allGather / reduceScatter
  ncclDataType_t type = ncclFloat32;
  Red red = Red::None;
  std::array<unsigned char, 8> scalar{};
  const void* scalarAddress = nullptr;
  int root = 0;
  int peer = 0; // Send, Recv
  // Send, Recv: its place among this rank's sends to (recvs from) `peer`,
  // in the order the calls reached group ends.
  uint64_t ordinal = 0;
};

using OpList = std::vector<Op>;

// Half types and fp8 are reduced in float and rounded once, as NCCL does.
template <typename T>
struct Accumulator {
  using type = T;
};
template <>
struct Accumulator<c10::Half> {
  using type = float;
};
template <>
struct Accumulator<c10::BFloat16> {
  using type = float;
};
template <>
struct Accumulator<c10::Float8_e4m3fn> {
  using type = float;
};
template <>
struct Accumulator<c10::Float8_e5m2> {
  using type = float;
};

// Integer sums and products wrap, as on the GPU (and without signed overflow UB).
template <typename A>
A add(A a, A b) {
  if constexpr (std::is_integral_v<A>) {
    using U = std::make_unsigned_t<A>;
    return static_cast<A>(static_cast<U>(static_cast<U>(a) + static_cast<U>(b)));
  } else {
    return a + b;
  }
}

template <typename A>
A mul(A a, A b) {
  if constexpr (std::is_integral_v<A>) {
    using U = std::conditional_t<(sizeof(A) < sizeof(unsigned)), unsigned, std::make_unsigned_t<A>>;
    return static_cast<A>(static_cast<U>(static_cast<U>(a) * static_cast<U>(b)));
  } else {
    return a * b;
  }
}

// Reduces `count` elements of every rank's source (in rank order) into dst.
template <typename T>
void reduce(
    const std::vector<const unsigned char*>& sources,
    const std::vector<const unsigned char*>& scalars,
    size_t count,
    Red red,
    unsigned char* dst) {
  using A = typename Accumulator<T>::type;
  const size_t n = sources.size();
  for (size_t i = 0; i < count; ++i) {
    A acc{};
    for (size_t j = 0; j < n; ++j) {
      T x;
      std::memcpy(&x, sources[j] + i * sizeof(T), sizeof(T));
      A v = static_cast<A>(x);
      if (red == Red::PreMulSum) {
        T s;
        std::memcpy(&s, scalars[j], sizeof(T));
        v = mul<A>(static_cast<A>(s), v);
      }
      if (j == 0) {
        acc = v;
        continue;
      }
      switch (red) {
        case Red::Sum:
        case Red::Avg:
        case Red::PreMulSum:
          acc = add<A>(acc, v);
          break;
        case Red::Prod:
          acc = mul<A>(acc, v);
          break;
        case Red::Max:
          acc = v > acc ? v : acc;
          break;
        case Red::Min:
          acc = v < acc ? v : acc;
          break;
        case Red::None:
          break;
      }
    }
    if (red == Red::Avg) {
      acc = static_cast<A>(acc / static_cast<A>(n));
    }
    const T out = static_cast<T>(acc);
    std::memcpy(dst + i * sizeof(T), &out, sizeof(T));
  }
}

void reduceAny(
    ncclDataType_t type,
    const std::vector<const unsigned char*>& sources,
    const std::vector<const unsigned char*>& scalars,
    size_t count,
    Red red,
    unsigned char* dst) {
  switch (type) {
    case ncclInt8: return reduce<int8_t>(sources, scalars, count, red, dst);
    case ncclUint8: return reduce<uint8_t>(sources, scalars, count, red, dst);
    case ncclInt32: return reduce<int32_t>(sources, scalars, count, red, dst);
    case ncclUint32: return reduce<uint32_t>(sources, scalars, count, red, dst);
    case ncclInt64: return reduce<int64_t>(sources, scalars, count, red, dst);
    case ncclUint64: return reduce<uint64_t>(sources, scalars, count, red, dst);
    case ncclFloat16: return reduce<c10::Half>(sources, scalars, count, red, dst);
    case ncclFloat32: return reduce<float>(sources, scalars, count, red, dst);
    case ncclFloat64: return reduce<double>(sources, scalars, count, red, dst);
    case ncclBfloat16: return reduce<c10::BFloat16>(sources, scalars, count, red, dst);
    case ncclFloat8e4m3: return reduce<c10::Float8_e4m3fn>(sources, scalars, count, red, dst);
    case ncclFloat8e5m2: return reduce<c10::Float8_e5m2>(sources, scalars, count, red, dst);
    default: return;
  }
}

// A blocking config unless config->blocking is 0; nullopt for a value NCCL
// rejects.
std::optional<bool> blockingOf(const ncclConfig_t* config) {
  if (config == nullptr || config->blocking == NCCL_CONFIG_UNDEF_INT || config->blocking == 1) {
    return true;
  }
  if (config->blocking == 0) {
    return false;
  }
  return std::nullopt;
}

bool hasCollective(const OpList& ops) {
  return std::any_of(ops.begin(), ops.end(), [](const Op& op) { return !isPointToPoint(op.kind); });
}

// The collectives of a kernel, in order: the k-th meets every rank's k-th,
// wherever the group put its sends and recvs.
std::vector<const Op*> collectivesOf(const OpList& ops) {
  std::vector<const Op*> out;
  for (const Op& op : ops) {
    if (!isPointToPoint(op.kind)) {
      out.push_back(&op);
    }
  }
  return out;
}

// The k-th send from one rank to another of a clique, and the recv it pairs
// with. NCCL pairs them by peer and order alone, whatever else either rank
// runs, and only the two ranks take part ("Any point-to-point communication
// needs two NCCL calls: a call to ncclSend on one rank and a corresponding
// ncclRecv on the other rank, with the same count and data type", NCCL user
// guide, "Point-to-point communication"). Each side "is blocking for the
// GPU" (NCCL API, ncclSend / ncclRecv): its kernel ends only once the other
// side ran and the data moved, so a send whose recv never runs holds its
// stream, and the communicator, forever.
// The ops of one group progress together (NCCL API, ncclSend: "If multiple
// ncclSend and ncclRecv operations need to progress concurrently to
// complete, they must be fused within a ncclGroupStart/ncclGroupEnd"), so
// the bytes move as soon as both sides run, whichever waits for what else.
struct Channel {
  const Op* send = nullptr; // posted by the sender's running kernel
  const Op* recv = nullptr; // posted by the receiver's running kernel
  bool copied = false; // the send's bytes are in `bytes`
  std::vector<unsigned char> bytes; // for the recv, written at its kernel's end
  int left = 0; // sides done with it
};

// One kernel sequence number of a clique: where its ranks' kernels that hold
// a collective meet (only those need every rank).
struct Round {
  explicit Round(int n) : ops(n) {}
  std::vector<std::shared_ptr<const OpList>> ops; // by rank; fixed once met
  int joined = 0;
  bool met = false; // every rank joined; nobody may leave before the data moved
  Clock::time_point metAt;
  int computed = 0;
  int left = 0;
};

struct Clique;

// The k-th split of a parent clique.
struct SplitRound {
  struct Member {
    int color = NCCL_SPLIT_NOCOLOR;
    int key = 0;
    int device = 0;
    bool childBlocking = true;
  };
  explicit SplitRound(int n) : members(n), childRank(n, -1) {}
  std::vector<Member> members; // by parent rank
  int arrived = 0;
  bool complete = false;
  Clock::time_point completeAt;
  std::vector<int> childRank; // by parent rank
  std::map<int, std::shared_ptr<Clique>> children; // by color
};

// The k-th window registration of a clique: collective, so it completes
// when every rank made its k-th call.
struct WindowRound {
  explicit WindowRound(int n) : handles(n, nullptr) {}
  std::vector<void*> handles; // by rank
  int arrived = 0;
  bool complete = false;
};

// The ranks of one communicator, across their Comm objects.
struct Clique {
  explicit Clique(int n) : nranks(n), taken(n, false) {}
  const int nranks;
  std::vector<bool> taken; // ranks that arrived (init)
  int arrived = 0;
  bool complete = false;
  Clock::time_point completeAt;
  std::map<uint64_t, std::shared_ptr<Round>> rounds;
  // By (from, to, ordinal).
  std::map<std::tuple<int, int, uint64_t>, std::shared_ptr<Channel>> channels;
  std::map<int, std::shared_ptr<SplitRound>> splits;
  std::map<int, std::shared_ptr<WindowRound>> windows;
  // Members created and not yet freed, and what the freed ones took of
  // their devices (given back with the last: every rank is in this process).
  int liveMembers = 0;
  std::vector<std::pair<int, int64_t>> heldBytes;
  // Members whose first group end with a collective has come: the peers
  // connect when all have (see runGroup).
  int connecting = 0;
  bool connected = false;
  // The lowest compute capability (major) of its ranks' devices: what NCCL
  // checks FP8 reductions against (comm->minCompCap, the minimum of every
  // peer's cudaCompCap, src/init.cc; checked in src/enqueue.cc).
  int minComputeMajor = 1 << 30;
};

enum class Pending { None, Init, Split, Group, Finalize, Window };

struct PreMul {
  ncclDataType_t type = ncclFloat32;
  std::array<unsigned char, 8> scalar{};
  const void* scalarAddress = nullptr;
};

// One rank's communicator. The immutable fields are set before the handle
// is published; the rest is guarded by SimNccl::Impl::mu.
struct Comm {
  uint64_t id = 0;
  std::shared_ptr<Clique> clique;
  int rank = 0;
  int nranks = 0;
  int device = 0;
  bool blocking = true;

  bool live = true; // a valid handle (not aborted, destroyed or freed)
  bool aborted = false;
  bool finalized = false;
  ncclResult_t state = ncclSuccess; // ncclInProgress while `pending` runs
  Pending pending = Pending::None;
  std::shared_ptr<SplitRound> split; // with Pending::Split
  ncclComm_t* splitSlot = nullptr;
  std::shared_ptr<WindowRound> window; // with Pending::Window
  void** windowSlot = nullptr;
  int windowCalls = 0;
  ncclResult_t asyncError = ncclSuccess;
  bool injected = false; // kernels block until abort
  std::string lastError;
  uint64_t nextKernel = 0; // kernels that hold a collective
  std::map<int, uint64_t> sendsTo; // by peer: the next send's ordinal
  std::map<int, uint64_t> recvsFrom;
  int splitCalls = 0;
  int inFlight = 0; // kernels handed to a stream that have not left it
  int running = 0;
  std::optional<std::chrono::microseconds> groupEndDelay;
  bool firstGroupRan = false;
  bool joinedConnection = false; // counted in its clique's `connecting`
  int64_t deviceBytes = 0; // what it took of its device's memory
  std::map<int, PreMul> redOps;
  int nextRedOp = 0;
};

// One kernel: every op of a group on one communicator and stream.
struct KernelSpec {
  std::shared_ptr<Comm> comm;
  cudaStream_t stream = nullptr;
  uint64_t seq = 0;
  std::shared_ptr<OpList> ops;
  // Launched into a stream capture: it takes its seq at each graph launch.
  bool captured = false;
};

struct GroupCall {
  std::shared_ptr<Comm> comm;
  cudaStream_t stream = nullptr;
  Op op;
};

} // namespace

struct SimNccl::Impl {
  struct ThreadState {
    int depth = 0;
    std::vector<GroupCall> calls;
    ncclResult_t groupError = ncclSuccess;
    std::string lastError;
    std::string lastErrorView; // what getLastError() returned last; stable until the next call
  };

  // Counts a kernel as on its stream until the kernel's function object is
  // released (it ran, or the stream dropped it): what commAbort, finalize
  // and ~SimNccl wait for.
  struct InFlight {
    InFlight(Impl* i, std::shared_ptr<Comm> c) : impl(i), comm(std::move(c)) {}
    ~InFlight() {
      std::lock_guard<std::mutex> lock(impl->mu);
      --comm->inFlight;
      impl->cv.notify_all();
    }
    InFlight(const InFlight&) = delete;
    InFlight& operator=(const InFlight&) = delete;
    Impl* impl;
    std::shared_ptr<Comm> comm;
  };

  struct Launch {
    cudaStream_t stream;
    std::function<void()> kernel;
    std::string label;
    uint64_t comm;
    std::function<std::function<void()>()> rearm; // a captured kernel's
  };

  Impl(std::shared_ptr<SimGpu> g, int v) : gpu(std::move(g)), version(v) {}

  const std::shared_ptr<SimGpu> gpu;
  const int version;
  const uint64_t serial = nextInstanceSerial.fetch_add(1);

  // One lock for all communicator, clique and round state; `cv` signals
  // every change of it (arrivals, aborts, kernels leaving). SimGpu is never
  // called with `mu` held, so its locks and ours never nest.
  mutable std::mutex mu;
  std::condition_variable cv;
  std::unordered_map<Comm*, std::shared_ptr<Comm>> live;
  std::vector<std::shared_ptr<Comm>> all; // may still have kernels on streams
  std::map<std::string, std::shared_ptr<Clique>> pendingInits; // by unique id
  std::map<void*, Comm*> registrations;
  std::set<void*> memAllocs; // ncclMemAlloc'd blocks
  uintptr_t nextRegistration = 1;
  bool localRegistration = true;
  std::chrono::microseconds initDelay{0};
  std::optional<std::chrono::microseconds> groupEndDelay;
  std::atomic<bool> launchOrderImplicit{false};
  std::chrono::microseconds collectiveDuration{0};
  int64_t creationBytes = SimNccl::kCommBytes;
  int64_t firstUseBytes = SimNccl::kFirstUseBytes;
  int leaked = 0;
  int overlaps = 0;
  int stackSlotWindows = 0;
  int groupThreads = 0; // group-end threads still running
  CallGate gate; // calls that hang (SimNccl::Call)

  // The background thread's timed queue, under `mu`.
  std::multimap<Clock::time_point, std::function<void()>> timed;
  std::condition_variable timedCv;
  bool stopping = false;
  std::thread background;

  ThreadState& self() const {
    thread_local std::unordered_map<uint64_t, ThreadState> states;
    return states[serial];
  }

  ncclResult_t failLocked(Comm* comm, ncclResult_t result, std::string message) {
    if (comm != nullptr) {
      comm->lastError = message;
    }
    self().lastError = std::move(message);
    return result;
  }

  std::shared_ptr<Comm> findLocked(ncclComm_t handle) const {
    auto it = live.find(reinterpret_cast<Comm*>(handle));
    return it == live.end() ? nullptr : it->second;
  }

  // Resolves `handle` to a communicator ready for a call: live and not in
  // progress. On failure returns the error (with the last error set).
  ncclResult_t usableLocked(ncclComm_t handle, std::shared_ptr<Comm>& out, const char* what) {
    out = findLocked(handle);
    if (!out) {
      return failLocked(
          nullptr, ncclInvalidArgument,
          std::string(what) + ": invalid communicator (null, destroyed or aborted)");
    }
    refreshLocked(*out);
    if (out->state == ncclInProgress) {
      // NCCL 2.30.7 src/init.cc ncclCommEnsureReady, which every call on a
      // communicator makes first (collectives, count, split, finalize,
      // destroy, registration): the same code and words as NCCL.
      return failLocked(
          out.get(), ncclInvalidArgument,
          std::string(what) + ": Attempt to use communicator before the previous operation returned ncclSuccess");
    }
    return ncclSuccess;
  }

  void scheduleLocked(Clock::time_point due, std::function<void()> task) {
    timed.emplace(due, std::move(task));
    timedCv.notify_all();
  }

  // At `due`, the background thread moves on the pending operation of each
  // live communicator `chosen` picks (as NCCL's own thread would, whether
  // anyone polls or not).
  void refreshLaterLocked(Clock::time_point due, const std::function<bool(const Comm&)>& chosen) {
    for (const auto& [ptr, member] : live) {
      if (chosen(*member)) {
        scheduleLocked(due, [this, weak = std::weak_ptr<Comm>(member)] {
          std::lock_guard<std::mutex> taskLock(mu);
          if (auto m = weak.lock(); m && m->live) {
            refreshLocked(*m);
          }
          cv.notify_all();
        });
      }
    }
  }

  std::shared_ptr<Comm> newCommLocked(
      std::shared_ptr<Clique> clique, int rank, int device, bool blocking) {
    // Forget communicators that can never run a kernel again.
    std::erase_if(all, [](const std::shared_ptr<Comm>& c) { return !c->live && c->inFlight == 0; });
    auto c = std::make_shared<Comm>();
    c->id = nextCommId.fetch_add(1);
    c->nranks = clique->nranks;
    c->clique = std::move(clique);
    c->rank = rank;
    c->device = device;
    c->blocking = blocking;
    takeDeviceMemoryLocked(*c, creationBytes);
    ++c->clique->liveMembers;
    c->clique->minComputeMajor = std::min(c->clique->minComputeMajor, computeMajorOf(device));
    live.emplace(c.get(), c);
    all.push_back(c);
    return c;
  }

  // Makes `comm` invalid as a handle. Its kernels keep what they hold.
  int computeMajorOf(int device) const {
    int major = 0;
    (void)gpu->deviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    return major;
  }

  void takeDeviceMemoryLocked(Comm& comm, int64_t bytes) {
    gpu->allocate(comm.device, bytes);
    comm.deviceBytes += bytes;
  }

  void releaseLocked(Comm& comm) {
    live.erase(&comm);
    comm.live = false;
    Clique& clique = *comm.clique;
    clique.heldBytes.emplace_back(comm.device, comm.deviceBytes);
    comm.deviceBytes = 0;
    if (--clique.liveMembers == 0) {
      for (const auto& [device, bytes] : clique.heldBytes) {
        gpu->deallocate(device, bytes);
      }
      clique.heldBytes.clear();
    }
    std::erase_if(registrations, [&](const auto& entry) { return entry.second == &comm; });
  }

  void abortLocked(Comm& comm) {
    releaseLocked(comm);
    comm.aborted = true;
    if (comm.pending == Pending::Split && comm.splitSlot != nullptr) {
      // NCCL's abort joins the split's job (ncclCommEnsureReady ->
      // ncclGroupJobAbort), whose child init then fails and still writes
      // the half-built child to the caller's slot (NCCL 2.30.7 src/init.cc
      // ncclCommInitRankFunc: fail -> exit -> __atomic_store_n(job->newcomm)):
      // a communicator in error that only ncclCommAbort frees.
      const SplitRound::Member& me = comm.split->members[comm.rank];
      if (me.color != NCCL_SPLIT_NOCOLOR) {
        auto child = newCommLocked(std::make_shared<Clique>(comm.nranks), comm.rank, me.device, me.childBlocking);
        child->asyncError = ncclInternalError;
        child->lastError = "ncclCommSplit: the parent was aborted before the split completed";
        *comm.splitSlot = reinterpret_cast<ncclComm_t>(child.get());
      }
    }
    // A pending split or group never completes: nothing more is written,
    // nothing enqueued.
    comm.pending = Pending::None;
    comm.split.reset();
    comm.splitSlot = nullptr;
    comm.window.reset();
    comm.windowSlot = nullptr;
    cv.notify_all();
  }

  // Moves a nonblocking operation of `comm` on once its condition holds;
  // called wherever the state is observed, so no thread has to watch it.
  void refreshLocked(Comm& comm) {
    if (comm.state != ncclInProgress) {
      return;
    }
    const auto now = Clock::now();
    switch (comm.pending) {
      case Pending::Init:
        if (comm.clique->complete && now >= comm.clique->completeAt + initDelay) {
          comm.state = ncclSuccess;
          comm.pending = Pending::None;
        }
        break;
      case Pending::Split:
        if (comm.split->complete && now >= comm.split->completeAt + initDelay) {
          finishSplitLocked(comm, *comm.split, comm.splitSlot);
          comm.split.reset();
          comm.splitSlot = nullptr;
          comm.state = ncclSuccess;
          comm.pending = Pending::None;
        }
        break;
      case Pending::Finalize:
        if (comm.inFlight == 0) {
          comm.state = ncclSuccess;
          comm.pending = Pending::None;
        }
        break;
      case Pending::Window:
        if (comm.window->complete) {
          // Written when the registration completes, by whichever thread
          // sees it first: NCCL's own, possibly after the caller returned.
          *comm.windowSlot = comm.window->handles[comm.rank];
          comm.window.reset();
          comm.windowSlot = nullptr;
          comm.state = ncclSuccess;
          comm.pending = Pending::None;
        }
        break;
      case Pending::Group: // the background thread ends it
      case Pending::None:
        break;
    }
  }

  void completeSplitLocked(SplitRound& round) {
    round.complete = true;
    round.completeAt = Clock::now();
    std::map<int, std::vector<int>> byColor;
    for (int p = 0; p < static_cast<int>(round.members.size()); ++p) {
      if (round.members[p].color != NCCL_SPLIT_NOCOLOR) {
        byColor[round.members[p].color].push_back(p);
      }
    }
    for (auto& [color, ranks] : byColor) {
      std::stable_sort(ranks.begin(), ranks.end(), [&](int a, int b) {
        return round.members[a].key < round.members[b].key; // ties: parent rank order
      });
      auto clique = std::make_shared<Clique>(static_cast<int>(ranks.size()));
      clique->complete = true; // every member is known: nothing to wait for
      clique->arrived = clique->nranks;
      for (int i = 0; i < static_cast<int>(ranks.size()); ++i) {
        round.childRank[ranks[i]] = i;
        clique->minComputeMajor = std::min(
            clique->minComputeMajor, computeMajorOf(round.members[ranks[i]].device));
      }
      round.children[color] = std::move(clique);
    }
    cv.notify_all();
  }

  // Creates `parent`'s child of a completed split and hands it out.
  void finishSplitLocked(Comm& parent, SplitRound& round, ncclComm_t* slot) {
    const SplitRound::Member& me = round.members[parent.rank];
    ncclComm_t child = nullptr;
    if (me.color != NCCL_SPLIT_NOCOLOR) {
      auto c = newCommLocked(
          round.children.at(me.color), round.childRank[parent.rank], me.device, me.childBlocking);
      child = reinterpret_cast<ncclComm_t>(c.get());
    }
    if (slot != nullptr) {
      *slot = child;
    }
  }

  std::function<void()> kernelLocked(const KernelSpec& spec) {
    ++spec.comm->inFlight;
    auto token = std::make_shared<InFlight>(this, spec.comm);
    return [this, spec, token] { runKernel(spec); };
  }

  // The launch of `spec`: a captured kernel is not run (its stream records
  // it); each launch of the graph makes a kernel of its own, which takes
  // the next place among its communicator's kernels, as every replay of a
  // captured collective is a collective of its own. The graph holds this
  // SimNccl's address: a test launches its graphs while the SimNccl lives.
  Launch launchOfLocked(const KernelSpec& spec) {
    if (!spec.captured) {
      return Launch{spec.stream, kernelLocked(spec), labelOf(*spec.ops), spec.comm->id, {}};
    }
    auto rearm = [this, spec] {
      std::lock_guard<std::mutex> lock(mu);
      KernelSpec replay = spec;
      replay.captured = false;
      replay.ops = std::make_shared<OpList>(*spec.ops);
      placeLocked(replay);
      return kernelLocked(replay);
    };
    return Launch{spec.stream, [] {}, labelOf(*spec.ops), spec.comm->id, std::move(rearm)};
  }

  // Gives `kernel` its place among its communicator's kernels: a collective
  // round, and each send and recv its place among those with the same peer.
  static void placeLocked(KernelSpec& kernel) {
    Comm& comm = *kernel.comm;
    if (hasCollective(*kernel.ops)) {
      kernel.seq = comm.nextKernel++;
    }
    for (Op& op : *kernel.ops) {
      if (op.kind == Kind::Send) {
        op.ordinal = comm.sendsTo[op.peer]++;
      } else if (op.kind == Kind::Recv) {
        op.ordinal = comm.recvsFrom[op.peer]++;
      }
    }
  }

  static std::string labelOf(const OpList& ops) {
    std::string label = pycomm::sim::labelOf(ops.front().kind);
    if (ops.size() > 1) {
      label += " x" + std::to_string(ops.size());
    }
    return label;
  }

  void launchAll(std::vector<Launch>& launches) {
    for (auto& l : launches) {
      gpu->launchCollective(
          l.stream, std::move(l.kernel), std::move(l.label), l.comm, launchOrderImplicit.load(),
          std::move(l.rearm));
    }
    launches.clear();
  }

  // Why the ranks' op lists of a round cannot form one collective; empty if they can.
  static std::string mismatchOf(const Round& round) {
    // Sends and recvs pair through their channels instead.
    const auto first = collectivesOf(*round.ops[0]);
    for (size_t r = 1; r < round.ops.size(); ++r) {
      const auto other = collectivesOf(*round.ops[r]);
      if (other.size() != first.size()) {
        return "collective mismatch: rank 0 issued " + std::to_string(first.size()) +
            " collectives in this kernel, rank " + std::to_string(r) + " issued " +
            std::to_string(other.size());
      }
      for (size_t k = 0; k < first.size(); ++k) {
        const Op& a = *first[k];
        const Op& b = *other[k];
        if (a.kind != b.kind || a.count != b.count || a.type != b.type || a.red != b.red ||
            a.root != b.root) {
          auto describe = [](const Op& op) {
            return std::string(pycomm::sim::labelOf(op.kind)) + "(count " +
                std::to_string(op.count) + ", type " + std::to_string(op.type) + ", op " +
                pycomm::sim::labelOf(op.red) + ", root " + std::to_string(op.root) + ")";
          };
          return "collective mismatch in op " + std::to_string(k) + ": rank 0 issued " +
              describe(a) + ", rank " + std::to_string(r) + " issued " + describe(b);
        }
      }
    }
    return {};
  }

  // Whether a send and the recv it pairs with disagree on what moves: "the
  // count and datatype ... must be the same on both sides" (NCCL API,
  // ncclSend / ncclRecv).
  static bool pairMismatched(const Channel& channel) {
    return channel.send->count != channel.recv->count || channel.send->type != channel.recv->type;
  }

  // Moves a channel's bytes once both sides run (under `mu`, so a side that
  // withdraws cannot free its buffer meanwhile); whether it moved them now.
  static bool progressLocked(Channel& channel) {
    if (channel.copied || channel.send == nullptr || channel.recv == nullptr || pairMismatched(channel)) {
      return false;
    }
    const auto* from = static_cast<const unsigned char*>(channel.send->input);
    channel.bytes.assign(from, from + channel.send->count * elementSize(channel.send->type));
    channel.copied = true;
    return true;
  }

  // Rank `rank`'s outputs of a met round, from every rank's inputs.
  static std::vector<std::vector<unsigned char>> compute(const Round& round, int rank) {
    const int n = static_cast<int>(round.ops.size());
    const OpList& mine = *round.ops[rank];
    std::vector<std::vector<const Op*>> collectives(n); // by rank
    for (int r = 0; r < n; ++r) {
      collectives[r] = collectivesOf(*round.ops[r]);
    }
    std::vector<std::vector<unsigned char>> out(mine.size());
    size_t c = 0; // this op's place among the collectives
    for (size_t k = 0; k < mine.size(); ++k) {
      const Op& op = mine[k];
      if (isPointToPoint(op.kind)) {
        continue; // they move through their channels (runKernelLocked)
      }
      const size_t place = c++;
      const size_t bytes = op.count * elementSize(op.type);
      auto inputOf = [&](int r) { return static_cast<const unsigned char*>(collectives[r][place]->input); };
      std::vector<unsigned char>& dst = out[k];
      switch (op.kind) {
        case Kind::AllGather:
          dst.resize(bytes * n);
          if (bytes > 0) {
            for (int r = 0; r < n; ++r) {
              std::memcpy(dst.data() + r * bytes, inputOf(r), bytes);
            }
          }
          break;
        case Kind::Broadcast:
          dst.resize(bytes);
          if (bytes > 0) {
            std::memcpy(dst.data(), inputOf(op.root), bytes);
          }
          break;
        case Kind::Send:
        case Kind::Recv:
          break;
        case Kind::AllReduce:
        case Kind::ReduceScatter:
        case Kind::Reduce: {
          if (op.kind == Kind::Reduce && rank != op.root) {
            break; // nothing written off the root
          }
          dst.resize(bytes);
          const size_t offset = op.kind == Kind::ReduceScatter ? rank * bytes : 0;
          std::vector<const unsigned char*> sources(n);
          std::vector<const unsigned char*> scalars(n);
          for (int r = 0; r < n; ++r) {
            const Op& theirs = *collectives[r][place];
            sources[r] = bytes > 0 ? inputOf(r) + offset : nullptr;
            scalars[r] = theirs.scalarAddress != nullptr
                ? static_cast<const unsigned char*>(theirs.scalarAddress)
                : theirs.scalar.data();
          }
          if (bytes > 0) {
            reduceAny(op.type, sources, scalars, op.count, op.red, dst.data());
          }
          break;
        }
      }
    }
    return out;
  }

  void leaveLocked(Comm& comm, uint64_t seq, Round& round) {
    if (++round.left == comm.nranks) {
      comm.clique->rounds.erase(seq);
    }
  }

  void runKernel(const KernelSpec& spec) {
    Comm& comm = *spec.comm;
    std::unique_lock<std::mutex> lock(mu);
    if (++comm.running > 1) {
      ++overlaps; // NCCL serializes a communicator's kernels; the caller did not
    }
    runKernelLocked(spec, lock);
    --comm.running;
  }

  void runKernelLocked(const KernelSpec& spec, std::unique_lock<std::mutex>& lock) {
    Comm& comm = *spec.comm;
    if (comm.aborted) {
      return;
    }
    if (comm.injected) {
      // A failed communicator moves no data: its peers wait for it.
      cv.wait(lock, [&] { return comm.aborted; });
      return;
    }
    Clique& clique = *comm.clique;
    const OpList& ops = *spec.ops;
    // Its sends and recvs are posted before it waits for anything, so a
    // peer's kernel finds them while this one waits for its round.
    struct Posted {
      size_t op;
      std::tuple<int, int, uint64_t> key;
      std::shared_ptr<Channel> channel;
    };
    std::vector<Posted> posted;
    for (size_t k = 0; k < ops.size(); ++k) {
      const Op& op = ops[k];
      if (!isPointToPoint(op.kind)) {
        continue;
      }
      const bool send = op.kind == Kind::Send;
      auto key = send ? std::make_tuple(comm.rank, op.peer, op.ordinal)
                      : std::make_tuple(op.peer, comm.rank, op.ordinal);
      std::shared_ptr<Channel>& entry = clique.channels[key];
      if (!entry) {
        entry = std::make_shared<Channel>();
      }
      (send ? entry->send : entry->recv) = &op;
      progressLocked(*entry);
      posted.push_back(Posted{k, key, entry});
    }
    if (!posted.empty()) {
      cv.notify_all();
    }
    auto leaveChannels = [&] {
      for (const Posted& p : posted) {
        if (!p.channel->copied) {
          // Withdrawn before the data moved: the peer keeps waiting (for a
          // rank that never comes, as on a GPU) and never reads this
          // rank's buffer.
          (ops[p.op].kind == Kind::Send ? p.channel->send : p.channel->recv) = nullptr;
        }
        if (++p.channel->left == 2) {
          clique.channels.erase(p.key);
        }
      }
    };
    auto hangUntilAborted = [&] {
      leaveChannels();
      cv.wait(lock, [&] { return comm.aborted; });
    };
    std::vector<std::vector<unsigned char>> outputs(ops.size());
    Clock::time_point movedAt{};
    if (hasCollective(ops)) {
      std::shared_ptr<Round>& entry = clique.rounds[spec.seq];
      if (!entry) {
        entry = std::make_shared<Round>(comm.nranks);
      }
      const std::shared_ptr<Round> round = entry;
      round->ops[comm.rank] = spec.ops;
      if (++round->joined == comm.nranks) {
        round->met = true;
        round->metAt = Clock::now();
        cv.notify_all();
      }
      cv.wait(lock, [&] { return round->met || comm.aborted || comm.injected; });
      if (!round->met) {
        // Leave before the peers met, so they keep waiting (for a rank that
        // never comes, as on a GPU) and never read this rank's buffers.
        round->ops[comm.rank] = nullptr;
        if (--round->joined == 0) {
          clique.rounds.erase(spec.seq);
        }
        hangUntilAborted();
        return;
      }
      if (!mismatchOf(*round).empty()) {
        // NCCL does not compare the ranks' calls: ranks whose counts, types
        // or ops differ wait for data that never comes, or read and write
        // past their buffers; nothing is reported (NCCL user guide,
        // "Troubleshooting / Errors": mismatched collectives hang). The
        // kernel moves nothing and holds its stream until the communicator
        // is aborted; pycomm's own answers (the timeout, PYCOMM_DEBUG=order)
        // are what tests assert.
        hangUntilAborted();
        leaveLocked(comm, spec.seq, *round);
        return;
      }
      // Between the two barriers every rank only computes: no wait here is
      // abort-aware, and none can last, so no rank frees its buffers while a
      // peer reads them.
      lock.unlock();
      outputs = compute(*round, comm.rank);
      lock.lock();
      if (++round->computed == comm.nranks) {
        cv.notify_all();
      }
      cv.wait(lock, [&] { return round->computed == comm.nranks; });
      movedAt = round->metAt;
      leaveLocked(comm, spec.seq, *round);
    }
    if (!posted.empty()) {
      // Each side ends once its channel moved the bytes. A pair whose counts
      // or types differ never moves (see pairMismatched): both sides hang,
      // as on a GPU.
      bool moved = false;
      while (true) {
        bool changed = false;
        moved = true;
        for (const Posted& p : posted) {
          changed = progressLocked(*p.channel) || changed;
          moved = moved && p.channel->copied;
        }
        if (changed) {
          cv.notify_all();
        }
        if (moved || comm.aborted || comm.injected) {
          break;
        }
        cv.wait(lock);
      }
      if (!moved) {
        hangUntilAborted();
        return;
      }
      for (const Posted& p : posted) {
        if (ops[p.op].kind == Kind::Recv) {
          outputs[p.op] = std::move(p.channel->bytes);
        }
      }
      leaveChannels();
      movedAt = Clock::now();
    }
    const auto deadline = movedAt + collectiveDuration;
    // The output is complete only when the kernel ends: a reader that does
    // not wait for the op's end sees what was there before. An abort ends
    // the kernel early, leaving the output as it is.
    cv.wait_until(lock, deadline, [&] { return comm.aborted; });
    if (!comm.aborted) {
      lock.unlock();
      for (size_t k = 0; k < outputs.size(); ++k) {
        if (!outputs[k].empty()) {
          std::memcpy((*spec.ops)[k].output, outputs[k].data(), outputs[k].size());
        }
      }
      lock.lock();
    }
    cv.wait(lock, [&] { return comm.aborted || !comm.injected; });
  }

  // Runs the ops collected by one outermost group (or one ungrouped call).
  ncclResult_t runGroup(std::vector<GroupCall> calls) {
    std::vector<Launch> launches;
    ncclResult_t result = ncclSuccess;
    std::vector<KernelSpec> kernels; // one per communicator and stream
    bool firstGroup = false; // some communicator's: it connects its peers
    bool async = true;
    // SimGpu is asked first: its locks are never taken under ours.
    std::set<cudaStream_t> capturingStreams;
    for (const auto& call : calls) {
      cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
      if (gpu->streamIsCapturing(call.stream, &status) == cudaSuccess &&
          status != cudaStreamCaptureStatusNone) {
        capturingStreams.insert(call.stream);
      }
    }
    {
      std::lock_guard<std::mutex> lock(mu);
      bool anyBlocking = false;
      bool anyNonblocking = false;
      for (const auto& call : calls) {
        Comm& c = *call.comm;
        if (!c.live) {
          return failLocked(nullptr, ncclInvalidArgument, "ncclGroupEnd: a communicator of the group was freed");
        }
        refreshLocked(c);
        if (c.state == ncclInProgress) {
          return failLocked(&c, ncclInvalidArgument,
                            "ncclGroupEnd: Attempt to use communicator before the previous operation returned ncclSuccess");
        }
        (c.blocking ? anyBlocking : anyNonblocking) = true;
      }
      if (anyBlocking && anyNonblocking) {
        return failLocked(
            nullptr, ncclInvalidUsage,
            "ncclGroupEnd: blocking and nonblocking communicators cannot be mixed in one group");
      }
      // One kernel per communicator and stream, in the order of first use.
      for (auto& call : calls) {
        auto it = std::find_if(kernels.begin(), kernels.end(), [&](const KernelSpec& k) {
          return k.comm == call.comm && k.stream == call.stream;
        });
        if (it == kernels.end()) {
          kernels.push_back(KernelSpec{
              call.comm, call.stream, 0, std::make_shared<OpList>(), capturingStreams.count(call.stream) > 0});
          it = std::prev(kernels.end());
        }
        it->ops->push_back(call.op);
      }
      for (auto& k : kernels) {
        if (k.captured && !k.comm->firstGroupRan) {
          // A first group connects the peers on the host and allocates the
          // communicator's buffers, which is not modelled inside a capture:
          // refused, stricter than NCCL may be.
          return failLocked(
              k.comm.get(), ncclInvalidUsage,
              "ncclGroupEnd: a communicator's first group captured into a CUDA graph (not modelled)");
        }
        if (!k.captured) {
          placeLocked(k);
        }
      }
      // A nonblocking group end that carries work hands the launch to a
      // thread NCCL starts for it and answers ncclInProgress, every time,
      // not only while a communicator connects (NCCL 2.30.7 src/group.cc,
      // ncclGroupEndInternal -> groupLaunchNonBlocking; user guide
      // "Nonblocking Group Operation": the kernels "are being issued to
      // streams in the background"). A blocking one launches on the
      // calling thread.
      // NCCL connects a communicator's peers at its first group end, not at
      // creation (NCCL_RUNTIME_CONNECT=1, the default since 2.22; NCCL 2.30.7
      // src/group.cc groupLaunch -> ncclPrepareTasksAndCollPreconnect ->
      // src/transport.cc ncclTransportP2pSetup, blocking bootstrap
      // send/recv with each peer), and launches only once connected: a
      // blocking group end waits for the peers on the calling thread, a
      // nonblocking one on NCCL's thread, in progress meanwhile. Not
      // modelled: a later group that needs another algorithm connects again.
      for (const auto& k : kernels) {
        if (!k.comm->firstGroupRan) { // NCCL allocates its buffers lazily
          takeDeviceMemoryLocked(*k.comm, firstUseBytes);
          k.comm->firstGroupRan = true;
        }
        // Sends and recvs connect only their two ranks (NCCL 2.30.7
        // src/group.cc, ncclPrepareTasksAndCollPreconnect: ncclTransportP2pSetup
        // for the peers of the group's p2p tasks), which the kernels'
        // pairing models: a group of sends and recvs alone waits for no one.
        if (hasCollective(*k.ops) && !k.comm->joinedConnection) {
          k.comm->joinedConnection = true;
          Clique& clique = *k.comm->clique;
          if (++clique.connecting == clique.nranks) {
            clique.connected = true;
            cv.notify_all();
          }
          firstGroup = true;
        }
      }
      async = !anyBlocking;
      if (!async) {
        for (const auto& k : kernels) {
          launches.push_back(launchOfLocked(k));
        }
      } else {
        // Per communicator: in progress until the background thread has put
        // its kernels on their streams, after the group-end delay.
        std::vector<std::shared_ptr<Comm>> comms;
        for (const auto& k : kernels) {
          if (std::find(comms.begin(), comms.end(), k.comm) == comms.end()) {
            comms.push_back(k.comm);
          }
        }
        for (const auto& c : comms) {
          std::vector<KernelSpec> mine;
          bool connects = false; // it holds a collective
          for (const auto& k : kernels) {
            if (k.comm == c) {
              mine.push_back(k);
              connects = connects || hasCollective(*k.ops);
            }
          }
          c->state = ncclInProgress;
          c->pending = Pending::Group;
          const auto delay = c->groupEndDelay.value_or(
              groupEndDelay.value_or(std::chrono::microseconds(0)));
          // A thread per group end, as NCCL starts one: its cost is part
          // of what a nonblocking group end costs its caller.
          ++groupThreads;
          std::thread([this, c, delay, connects, mine = std::move(mine)] {
            std::this_thread::sleep_for(delay);
            if (connects) {
              waitConnected(*c);
            }
            enqueueDeferred(c, mine);
            std::lock_guard<std::mutex> threadLock(mu);
            --groupThreads;
            cv.notify_all();
          }).detach();
        }
        result = ncclInProgress;
      }
    }
    if (!async && firstGroup) {
      std::unique_lock<std::mutex> lock(mu);
      for (const auto& k : kernels) {
        if (!hasCollective(*k.ops)) {
          continue;
        }
        cv.wait(lock, [&] { return k.comm->clique->connected || k.comm->aborted; });
        if (k.comm->aborted) {
          result = failLocked(nullptr, ncclSystemError, "ncclGroupEnd: aborted while connecting to the peers");
        }
      }
    }
    launchAll(launches); // an aborted communicator's kernels return at once
    return result;
  }

  // Until every member of `c`'s clique came to its first group end (or `c`
  // was aborted): the connection a first group waits for.
  void waitConnected(Comm& c) {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return c.clique->connected || c.aborted || !c.live; });
  }

  // A nonblocking group's kernels, on the background thread.
  void enqueueDeferred(const std::shared_ptr<Comm>& c, const std::vector<KernelSpec>& kernels) {
    std::vector<Launch> launches;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (!c->live || c->aborted || c->pending != Pending::Group) {
        return; // aborted meanwhile: the group never runs
      }
      for (const auto& k : kernels) {
        launches.push_back(launchOfLocked(k));
      }
    }
    launchAll(launches);
    // Only now, with the kernels on their streams, may a poll see success:
    // the caller records its events behind them right after.
    std::lock_guard<std::mutex> lock(mu);
    if (c->live && !c->aborted && c->pending == Pending::Group) {
      c->state = ncclSuccess;
      c->pending = Pending::None;
    }
    cv.notify_all();
  }

  void backgroundLoop() {
    std::unique_lock<std::mutex> lock(mu);
    while (!stopping) {
      if (timed.empty()) {
        timedCv.wait(lock);
        continue;
      }
      const auto due = timed.begin()->first;
      if (Clock::now() < due) {
        timedCv.wait_until(lock, due);
        continue;
      }
      std::function<void()> task = std::move(timed.begin()->second);
      timed.erase(timed.begin());
      lock.unlock();
      task();
      task = nullptr; // what it holds goes outside the lock
      lock.lock();
    }
  }

  // Maps a reduce op to what the kernel does, with a premul-sum's scalar;
  // an error text, empty on success.
  static std::string resolveRed(const Comm& comm, ncclRedOp_t red, ncclDataType_t type, Op& out) {
    if (isFp8(type) && comm.clique->minComputeMajor < 9) {
      return "FP8 reduction support begins with sm90 capable devices (the lowest "
          "compute capability of this communicator's ranks is " +
          std::to_string(comm.clique->minComputeMajor) + ")";
    }
    switch (red) {
      case ncclSum: out.red = Red::Sum; return {};
      case ncclProd: out.red = Red::Prod; return {};
      case ncclMax: out.red = Red::Max; return {};
      case ncclMin: out.red = Red::Min; return {};
      case ncclAvg: out.red = Red::Avg; return {};
      default: break;
    }
    auto it = comm.redOps.find(static_cast<int>(red));
    if (it == comm.redOps.end()) {
      return "invalid reduce op " + std::to_string(static_cast<int>(red));
    }
    if (it->second.type != type) {
      return "the premul-sum op was made for another data type";
    }
    out.red = Red::PreMulSum;
    out.scalar = it->second.scalar;
    out.scalarAddress = it->second.scalarAddress;
    return {};
  }

  // Validates one collective call, then runs it as its own group or adds it
  // to the thread's open group. `red` is set for reductions.
  ncclResult_t collective(
      Op op, std::optional<ncclRedOp_t> red, ncclComm_t handle, cudaStream_t stream,
      const std::string& what) {
    // SimGpu is asked first: its locks are never taken under ours.
    SimStream* resolved = gpu->resolve(stream);
    const int streamDevice = resolved != nullptr ? gpu->deviceOf(stream) : -1;
    ThreadState& t = self();
    GroupCall call;
    const ncclResult_t result = [&]() -> ncclResult_t {
      std::lock_guard<std::mutex> lock(mu);
      std::shared_ptr<Comm> c;
      if (const ncclResult_t r = usableLocked(handle, c, what.c_str()); r != ncclSuccess) {
        return r;
      }
      Comm* cp = c.get();
      if (c->asyncError != ncclSuccess) {
        // NCCL checks a communicator's asynchronous state before taking a
        // call (ncclCommEnsureReady, src/enqueue.cc): one in error refuses
        // every collective with that error.
        return failLocked(cp, c->asyncError, what + ": the communicator is in error (" + c->lastError + ")");
      }
      if (c->finalized) {
        return failLocked(cp, ncclInvalidUsage, what + ": the communicator was finalized");
      }
      // A call NCCL's checks refuse puts a nonblocking communicator in error
      // for good: ncclEnqueueCheck's failure path stores the error as the
      // communicator's asynchronous state (NCCL 2.30.7 src/enqueue.cc,
      // "fail: ... ncclCommSetAsyncError(info->comm, ret)"), which every later
      // call then meets (ncclCommEnsureReady). A blocking one stays usable.
      auto refuse = [&](ncclResult_t code, const std::string& message) {
        if (!c->blocking) {
          c->asyncError = code;
        }
        return failLocked(cp, code, message);
      };
      if (op.type < 0 || op.type >= ncclNumTypes) {
        return refuse(ncclInvalidArgument, what + ": invalid data type " + std::to_string(op.type));
      }
      if (resolved == nullptr) {
        return refuse(
            ncclUnhandledCudaError, what + ": invalid stream (cudaErrorInvalidResourceHandle)");
      }
      if (streamDevice != c->device) {
        return refuse(
            ncclInvalidUsage,
            what + ": a stream of device " + std::to_string(streamDevice) +
                " for a communicator of device " + std::to_string(c->device));
      }
      if ((op.kind == Kind::Broadcast || op.kind == Kind::Reduce) && (op.root < 0 || op.root >= c->nranks)) {
        return refuse(ncclInvalidArgument, what + ": invalid root " + std::to_string(op.root));
      }
      if (isPointToPoint(op.kind) && (op.peer < 0 || op.peer >= c->nranks)) {
        return refuse(ncclInvalidArgument, what + ": invalid peer " + std::to_string(op.peer));
      }
      const size_t inElems = op.kind == Kind::ReduceScatter ? op.count * c->nranks
          : op.kind == Kind::Recv ? 0
          : op.count;
      const size_t outElems = op.kind == Kind::AllGather ? op.count * c->nranks
          : op.kind == Kind::Reduce && op.root != c->rank ? 0 // "may be NULL" off the root
          : op.kind == Kind::Send ? 0
          : op.count;
      const bool readsInput = op.kind != Kind::Broadcast || op.root == c->rank;
      if ((inElems > 0 && readsInput && op.input == nullptr) ||
          (outElems > 0 && op.output == nullptr)) {
        return refuse(ncclInvalidArgument, what + ": null buffer");
      }
      if (red) {
        if (std::string error = resolveRed(*c, *red, op.type, op); !error.empty()) {
          return refuse(ncclInvalidArgument, what + ": " + error);
        }
      }
      call.comm = std::move(c);
      return ncclSuccess;
    }();
    if (result != ncclSuccess) {
      if (t.depth > 0 && t.groupError == ncclSuccess) {
        t.groupError = result; // NCCL fails the whole group, too
      }
      return result;
    }
    call.stream = reinterpret_cast<cudaStream_t>(resolved);
    call.op = op;
    if (t.depth > 0) {
      t.calls.push_back(std::move(call));
      return ncclSuccess;
    }
    std::vector<GroupCall> calls;
    calls.push_back(std::move(call));
    return runGroup(std::move(calls));
  }
};

SimNccl::SimNccl(std::shared_ptr<SimGpu> gpu, int version)
    : impl_(std::make_unique<Impl>(std::move(gpu), version)) {
  impl_->background = std::thread(&Impl::backgroundLoop, impl_.get());
}

SimNccl::~SimNccl() {
  impl_->gate.releaseAll();
  impl_->gate.drain();
  {
    std::unique_lock<std::mutex> lock(impl_->mu);
    impl_->leaked += static_cast<int>(impl_->live.size());
    // Destroyed communicators may still have kernels waiting for peers:
    // every kernel must end before this object goes.
    for (const auto& c : impl_->all) {
      if (!c->aborted) {
        impl_->abortLocked(*c);
      }
    }
    impl_->cv.wait(lock, [&] {
      return impl_->groupThreads == 0 &&
          std::all_of(impl_->all.begin(), impl_->all.end(),
                      [](const std::shared_ptr<Comm>& c) { return c->inFlight == 0; });
    });
    impl_->stopping = true;
    impl_->timedCv.notify_all();
  }
  impl_->background.join();
  impl_->timed.clear();
}

ncclResult_t SimNccl::getVersion(int* version) {
  if (version == nullptr) {
    return ncclInvalidArgument;
  }
  *version = impl_->version;
  return ncclSuccess;
}

ncclResult_t SimNccl::getUniqueId(ncclUniqueId* id) {
  if (id == nullptr) {
    return ncclInvalidArgument;
  }
  std::memset(id->internal, 0, sizeof(id->internal));
  const char magic[] = "simnccl";
  std::memcpy(id->internal, magic, sizeof(magic));
  const uint64_t n = nextUniqueId.fetch_add(1);
  std::memcpy(id->internal + sizeof(magic), &n, sizeof(n));
  return ncclSuccess;
}

const char* SimNccl::getErrorString(ncclResult_t result) {
  switch (result) {
    case ncclSuccess: return "no error";
    case ncclUnhandledCudaError: return "unhandled cuda error (run with NCCL_DEBUG=INFO for details)";
    case ncclSystemError: return "unhandled system error (run with NCCL_DEBUG=INFO for details)";
    case ncclInternalError: return "internal error - please report this issue to the NCCL developers";
    case ncclInvalidArgument: return "invalid argument (run with NCCL_DEBUG=WARN for details)";
    case ncclInvalidUsage: return "invalid usage (run with NCCL_DEBUG=WARN for details)";
    case ncclRemoteError: return "remote process exited or there was a network error";
    case ncclInProgress: return "NCCL operation in progress";
    case ncclTimeout: return "NCCL timeout";
    default: return "unknown result code";
  }
}

const char* SimNccl::getLastError(ncclComm_t comm) {
  Impl::ThreadState& t = impl_->self();
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto c = comm != nullptr ? impl_->findLocked(comm) : nullptr;
  t.lastErrorView = c && !c->lastError.empty() ? c->lastError : t.lastError;
  return t.lastErrorView.c_str();
}

ncclResult_t SimNccl::commInitRankConfig(
    ncclComm_t* comm, int nranks, ncclUniqueId id, int rank, ncclConfig_t* config) {
  Impl& im = *impl_;
  const std::optional<bool> blocking = blockingOf(config);
  if (comm == nullptr || nranks <= 0 || rank < 0 || rank >= nranks || !blocking) {
    std::lock_guard<std::mutex> lock(im.mu);
    return im.failLocked(nullptr, ncclInvalidArgument, "ncclCommInitRankConfig: invalid argument");
  }
  // NCCL makes the current device's context current; so do we.
  const int device = im.gpu->currentDevice();
  (void)im.gpu->setDevice(device);

  std::unique_lock<std::mutex> lock(im.mu);
  const std::string key(id.internal, sizeof(id.internal));
  std::shared_ptr<Clique>& entry = im.pendingInits[key];
  if (!entry) {
    entry = std::make_shared<Clique>(nranks);
  }
  const std::shared_ptr<Clique> clique = entry;
  if (clique->nranks != nranks) {
    return im.failLocked(
        nullptr, ncclInvalidArgument,
        "ncclCommInitRankConfig: nranks " + std::to_string(nranks) + " differs from " +
            std::to_string(clique->nranks) + " given by another rank of this id");
  }
  if (clique->taken[rank]) {
    return im.failLocked(
        nullptr, ncclInvalidArgument,
        "ncclCommInitRankConfig: rank " + std::to_string(rank) + " already joined this id");
  }
  clique->taken[rank] = true;
  auto c = im.newCommLocked(clique, rank, device, *blocking);
  if (++clique->arrived == nranks) {
    clique->complete = true;
    clique->completeAt = Clock::now();
    im.pendingInits.erase(key);
    im.cv.notify_all();
  }
  const auto handle = reinterpret_cast<ncclComm_t>(c.get());
  if (*blocking) {
    im.cv.wait(lock, [&] { return clique->complete; });
    *comm = handle;
    return ncclSuccess;
  }
  c->state = ncclInProgress;
  c->pending = Pending::Init;
  *comm = handle;
  return ncclInProgress;
}

ncclResult_t SimNccl::commSplit(
    ncclComm_t parent, int color, int key, ncclComm_t* child, ncclConfig_t* config) {
  Impl& im = *impl_;
  const std::optional<bool> childBlocking = blockingOf(config);
  {
    std::lock_guard<std::mutex> lock(im.mu);
    std::shared_ptr<Comm> c;
    if (const ncclResult_t r = im.usableLocked(parent, c, "ncclCommSplit"); r != ncclSuccess) {
      return r;
    }
    if (child == nullptr || !childBlocking || (color < 0 && color != NCCL_SPLIT_NOCOLOR)) {
      return im.failLocked(c.get(), ncclInvalidArgument, "ncclCommSplit: invalid argument");
    }
  }
  const int device = im.gpu->currentDevice();
  (void)im.gpu->setDevice(device);

  std::unique_lock<std::mutex> lock(im.mu);
  std::shared_ptr<Comm> c;
  if (const ncclResult_t r = im.usableLocked(parent, c, "ncclCommSplit"); r != ncclSuccess) {
    return r;
  }
  // The k-th split of every rank of the parent belongs together.
  const int k = c->splitCalls++;
  std::shared_ptr<SplitRound>& entry = c->clique->splits[k];
  if (!entry) {
    entry = std::make_shared<SplitRound>(c->nranks);
  }
  const std::shared_ptr<SplitRound> round = entry;
  round->members[c->rank] = SplitRound::Member{color, key, device, *childBlocking};
  if (!c->blocking) {
    // NCCL 2.28.9 and 2.30.7 src/init.cc ncclCommInitChildComm: "*newcomm
    // should be NCCL_COMM_NULL until comm split fully complete"; the split's
    // job writes it from NCCL's thread when done.
    *child = nullptr;
    c->state = ncclInProgress;
    c->pending = Pending::Split;
    c->split = round;
    c->splitSlot = child;
  }
  if (++round->arrived == c->nranks) {
    c->clique->splits.erase(k);
    im.completeSplitLocked(*round);
    // Nonblocking members complete when polled, or by the background
    // thread once the init delay passed, whichever comes first.
    im.refreshLaterLocked(
        round->completeAt + im.initDelay,
        [&](const Comm& member) { return member.split == round; });
  }
  if (!c->blocking) {
    // ncclCommSplit returns what ncclCommInitChildComm returned: its
    // NCCLCHECK(ncclGroupEndInternal()) lets the group end's ncclInProgress
    // pass without returning it (src/include/checks.h), so a nonblocking
    // split still running reports ncclSuccess; only the parent's
    // ncclCommGetAsyncError says ncclInProgress until the child is written.
    return ncclSuccess;
  }
  im.cv.wait(lock, [&] { return round->complete || c->aborted; });
  if (c->aborted) {
    return im.failLocked(nullptr, ncclSystemError, "ncclCommSplit: the parent was aborted");
  }
  im.finishSplitLocked(*c, *round, child);
  return ncclSuccess;
}

ncclResult_t SimNccl::commFinalize(ncclComm_t comm) {
  std::unique_lock<std::mutex> lock(impl_->mu);
  std::shared_ptr<Comm> c;
  if (const ncclResult_t r = impl_->usableLocked(comm, c, "ncclCommFinalize"); r != ncclSuccess) {
    return r;
  }
  if (c->finalized) {
    // NCCL 2.30.7 ncclCommFinalize: "prevent double finalize".
    return impl_->failLocked(c.get(), ncclInvalidArgument, "ncclCommFinalize: the communicator was finalized already");
  }
  c->finalized = true;
  if (c->blocking) {
    impl_->cv.wait(lock, [&] { return c->inFlight == 0 || c->aborted; });
    return ncclSuccess;
  }
  c->state = ncclInProgress;
  c->pending = Pending::Finalize;
  return ncclInProgress;
}

ncclResult_t SimNccl::commDestroy(ncclComm_t comm) {
  impl_->gate.pass(static_cast<int>(Call::CommDestroy));
  std::lock_guard<std::mutex> lock(impl_->mu);
  std::shared_ptr<Comm> c;
  if (const ncclResult_t r = impl_->usableLocked(comm, c, "ncclCommDestroy"); r != ncclSuccess) {
    return r;
  }
  // Kernels still on streams keep the object; ~SimNccl ends them if their
  // peers never come.
  impl_->releaseLocked(*c);
  return ncclSuccess;
}

ncclResult_t SimNccl::commAbort(ncclComm_t comm) {
  // A hung abort does nothing: the communicator's kernels keep blocking.
  impl_->gate.pass(static_cast<int>(Call::CommAbort));
  std::unique_lock<std::mutex> lock(impl_->mu);
  std::shared_ptr<Comm> c = impl_->findLocked(comm);
  if (!c) {
    return impl_->failLocked(nullptr, ncclInvalidArgument, "ncclCommAbort: invalid communicator");
  }
  impl_->abortLocked(*c);
  // As NCCL's abort synchronizes its stream: also waits for unrelated work
  // queued before the kernels.
  impl_->cv.wait(lock, [&] { return c->inFlight == 0; });
  return ncclSuccess;
}

ncclResult_t SimNccl::commGetAsyncError(ncclComm_t comm, ncclResult_t* state) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  std::shared_ptr<Comm> c = impl_->findLocked(comm);
  if (!c || state == nullptr) {
    return impl_->failLocked(c.get(), ncclInvalidArgument, "ncclCommGetAsyncError: invalid argument");
  }
  impl_->refreshLocked(*c);
  *state = c->asyncError != ncclSuccess ? c->asyncError : c->state;
  return ncclSuccess;
}

ncclResult_t SimNccl::commCount(ncclComm_t comm, int* count) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  std::shared_ptr<Comm> c;
  if (const ncclResult_t r = impl_->usableLocked(comm, c, "ncclCommCount"); r != ncclSuccess) {
    return r;
  }
  if (count == nullptr) {
    return impl_->failLocked(c.get(), ncclInvalidArgument, "ncclCommCount: null count");
  }
  *count = c->nranks;
  return ncclSuccess;
}

ncclResult_t SimNccl::commUserRank(ncclComm_t comm, int* rank) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  std::shared_ptr<Comm> c;
  if (const ncclResult_t r = impl_->usableLocked(comm, c, "ncclCommUserRank"); r != ncclSuccess) {
    return r;
  }
  if (rank == nullptr) {
    return impl_->failLocked(c.get(), ncclInvalidArgument, "ncclCommUserRank: null rank");
  }
  *rank = c->rank;
  return ncclSuccess;
}

void SimNccl::setLocalRegistration(bool enabled) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->localRegistration = enabled;
}

ncclResult_t SimNccl::commRegister(ncclComm_t comm, void* buffer, size_t /*size*/, void** handle) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  if (!impl_->localRegistration) {
    *handle = nullptr; // NCCL checks nothing else first either
    return ncclSuccess;
  }
  // Plain registration is no operation on the communicator: NCCL makes no
  // ncclCommEnsureReady here (src/register/register.cc), so one in progress
  // takes it.
  std::shared_ptr<Comm> c = impl_->findLocked(comm);
  if (!c) {
    return impl_->failLocked(nullptr, ncclInvalidArgument, "ncclCommRegister: invalid communicator");
  }
  if (handle == nullptr || buffer == nullptr) {
    return impl_->failLocked(c.get(), ncclInvalidArgument, "ncclCommRegister: null buffer or handle");
  }
  // An opaque value nobody may dereference; aligned like a pointer.
  void* h = reinterpret_cast<void*>(impl_->nextRegistration++ << 4);
  impl_->registrations.emplace(h, c.get());
  *handle = h;
  return ncclSuccess;
}

ncclResult_t SimNccl::commDeregister(ncclComm_t comm, void* handle) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  std::shared_ptr<Comm> c = impl_->findLocked(comm); // no ncclCommEnsureReady either
  if (!c) {
    return impl_->failLocked(nullptr, ncclInvalidArgument, "ncclCommDeregister: invalid communicator");
  }
  if (handle == nullptr) {
    return ncclSuccess; // what a registration that registered nothing gave
  }
  auto it = impl_->registrations.find(handle);
  if (it == impl_->registrations.end() || it->second != c.get()) {
    return impl_->failLocked(c.get(), ncclInvalidArgument, "ncclCommDeregister: unknown handle");
  }
  impl_->registrations.erase(it);
  return ncclSuccess;
}

namespace {
// Whether `address` lies on the calling thread's stack.
bool onThisStack(const void* address) {
  pthread_attr_t attr;
  if (pthread_getattr_np(pthread_self(), &attr) != 0) {
    return false;
  }
  void* base = nullptr;
  size_t size = 0;
  const bool known = pthread_attr_getstack(&attr, &base, &size) == 0;
  pthread_attr_destroy(&attr);
  const auto a = reinterpret_cast<uintptr_t>(address);
  const auto b = reinterpret_cast<uintptr_t>(base);
  return known && a >= b && a < b + size;
}
} // namespace

// ncclCommWindowRegister as NCCL 2.30.7 does it (src/dev_runtime.cc;
// user guide "Window Registration"):
// - collective: every rank of the communicator must call it, in the same
//   order; a rank's call completes when all made theirs;
// - only memory of CUDA's virtual memory API (cuMem*, ncclMemAlloc): other
//   memory fails with ncclInvalidArgument, and like any failed call on a
//   communicator it leaves the communicator in error;
// - on a nonblocking communicator it returns ncclSuccess at once while the
//   communicator's state is ncclInProgress, and NCCL's thread writes
//   `*window` when the registration completes, after the call returned
//   (so the slot must outlive the call: one on the caller's stack is
//   counted in stackSlotWindows()); a blocking one waits inside the call.
ncclResult_t SimNccl::commWindowRegister(
    ncclComm_t comm, void* buffer, size_t size, void** window, int /*flags*/) {
  Impl& im = *impl_;
  // SimGpu is asked before our lock is taken: its locks never nest in ours.
  const bool vmm = buffer != nullptr &&
      im.gpu->inBlock(buffer, size, SimGpu::MemoryKind::Vmm);
  std::unique_lock<std::mutex> lock(im.mu);
  std::shared_ptr<Comm> c;
  if (const ncclResult_t r = im.usableLocked(comm, c, "ncclCommWindowRegister"); r != ncclSuccess) {
    return r;
  }
  if (window == nullptr || buffer == nullptr) {
    return im.failLocked(c.get(), ncclInvalidArgument, "ncclCommWindowRegister: null buffer or window");
  }
  if (!vmm) {
    c->asyncError = ncclInvalidArgument;
    return im.failLocked(
        c.get(), ncclInvalidArgument,
        "ncclCommWindowRegister: the buffer is not memory of CUDA's virtual memory API "
        "(cuMem*, ncclMemAlloc)");
  }
  if (!c->blocking && onThisStack(window)) {
    ++im.stackSlotWindows;
  }
  void* h = reinterpret_cast<void*>(im.nextRegistration++ << 4);
  im.registrations.emplace(h, c.get());
  const int k = c->windowCalls++;
  std::shared_ptr<WindowRound>& entry = c->clique->windows[k];
  if (!entry) {
    entry = std::make_shared<WindowRound>(c->nranks);
  }
  const std::shared_ptr<WindowRound> round = entry;
  round->handles[c->rank] = h;
  if (!c->blocking) {
    c->state = ncclInProgress;
    c->pending = Pending::Window;
    c->window = round;
    c->windowSlot = window;
  }
  if (++round->arrived == c->nranks) {
    c->clique->windows.erase(k);
    round->complete = true;
    // NCCL's thread finishes every member's registration, polled or not.
    im.refreshLaterLocked(Clock::now(), [&](const Comm& member) { return member.window == round; });
    im.cv.notify_all();
  }
  if (!c->blocking) {
    return ncclSuccess;
  }
  im.cv.wait(lock, [&] { return round->complete || c->aborted; });
  if (c->aborted) {
    return im.failLocked(nullptr, ncclSystemError, "ncclCommWindowRegister: the communicator was aborted");
  }
  *window = h;
  return ncclSuccess;
}

ncclResult_t SimNccl::commWindowDeregister(ncclComm_t comm, void* window) {
  return commDeregister(comm, window);
}

int SimNccl::torchGroupDepth() {
  return impl_->self().depth;
}

ncclResult_t SimNccl::groupStart() {
  ++impl_->self().depth;
  return ncclSuccess;
}

ncclResult_t SimNccl::groupEnd() {
  Impl::ThreadState& t = impl_->self();
  if (t.depth == 0) {
    std::lock_guard<std::mutex> lock(impl_->mu);
    return impl_->failLocked(nullptr, ncclInvalidUsage, "ncclGroupEnd: no group started");
  }
  if (--t.depth > 0) {
    return ncclSuccess;
  }
  std::vector<GroupCall> calls = std::move(t.calls);
  t.calls.clear();
  const ncclResult_t error = t.groupError;
  t.groupError = ncclSuccess;
  if (error != ncclSuccess) {
    return error; // a call of the group failed: NCCL runs none of it
  }
  if (calls.empty()) {
    return ncclSuccess;
  }
  return impl_->runGroup(std::move(calls));
}

ncclResult_t SimNccl::allGather(
    const void* input, void* output, size_t countPerRank, ncclDataType_t type,
    ncclComm_t comm, cudaStream_t stream) {
  Op op;
  op.kind = Kind::AllGather;
  op.input = input;
  op.output = output;
  op.count = countPerRank;
  op.type = type;
  return impl_->collective(op, std::nullopt, comm, stream, "ncclAllGather");
}

ncclResult_t SimNccl::reduceScatter(
    const void* input, void* output, size_t countPerRank, ncclDataType_t type,
    ncclRedOp_t red, ncclComm_t comm, cudaStream_t stream) {
  Op op;
  op.kind = Kind::ReduceScatter;
  op.input = input;
  op.output = output;
  op.count = countPerRank;
  op.type = type;
  return impl_->collective(op, red, comm, stream, "ncclReduceScatter");
}

ncclResult_t SimNccl::allReduce(
    const void* input, void* output, size_t count, ncclDataType_t type, ncclRedOp_t red,
    ncclComm_t comm, cudaStream_t stream) {
  Op op;
  op.kind = Kind::AllReduce;
  op.input = input;
  op.output = output;
  op.count = count;
  op.type = type;
  return impl_->collective(op, red, comm, stream, "ncclAllReduce");
}

ncclResult_t SimNccl::broadcast(
    const void* input, void* output, size_t count, ncclDataType_t type, int root,
    ncclComm_t comm, cudaStream_t stream) {
  Op op;
  op.kind = Kind::Broadcast;
  op.input = input;
  op.output = output;
  op.count = count;
  op.type = type;
  op.root = root;
  return impl_->collective(op, std::nullopt, comm, stream, "ncclBroadcast");
}

ncclResult_t SimNccl::reduce(
    const void* input, void* output, size_t count, ncclDataType_t type, ncclRedOp_t red,
    int root, ncclComm_t comm, cudaStream_t stream) {
  Op op;
  op.kind = Kind::Reduce;
  op.input = input;
  op.output = output;
  op.count = count;
  op.type = type;
  op.root = root;
  return impl_->collective(op, red, comm, stream, "ncclReduce");
}

ncclResult_t SimNccl::send(
    const void* input, size_t count, ncclDataType_t type, int peer, ncclComm_t comm,
    cudaStream_t stream) {
  Op op;
  op.kind = Kind::Send;
  op.input = input;
  op.count = count;
  op.type = type;
  op.peer = peer;
  return impl_->collective(op, std::nullopt, comm, stream, "ncclSend");
}

ncclResult_t SimNccl::recv(
    void* output, size_t count, ncclDataType_t type, int peer, ncclComm_t comm,
    cudaStream_t stream) {
  Op op;
  op.kind = Kind::Recv;
  op.output = output;
  op.count = count;
  op.type = type;
  op.peer = peer;
  return impl_->collective(op, std::nullopt, comm, stream, "ncclRecv");
}

ncclResult_t SimNccl::redOpCreatePreMulSum(
    ncclRedOp_t* op, void* scalar, ncclDataType_t type, ncclScalarResidence_t residence,
    ncclComm_t comm) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  std::shared_ptr<Comm> c;
  if (const ncclResult_t r = impl_->usableLocked(comm, c, "ncclRedOpCreatePreMulSum");
      r != ncclSuccess) {
    return r;
  }
  if (op == nullptr || scalar == nullptr || type < 0 || type >= ncclNumTypes ||
      (residence != ncclScalarHostImmediate && residence != ncclScalarDevice)) {
    return impl_->failLocked(c.get(), ncclInvalidArgument, "ncclRedOpCreatePreMulSum: invalid argument");
  }
  PreMul p;
  p.type = type;
  if (residence == ncclScalarHostImmediate) {
    std::memcpy(p.scalar.data(), scalar, elementSize(type));
  } else {
    p.scalarAddress = scalar; // read by the kernel, as from device memory
  }
  const int id = static_cast<int>(ncclNumOps) + c->nextRedOp++;
  c->redOps.emplace(id, p);
  *op = static_cast<ncclRedOp_t>(id);
  return ncclSuccess;
}

ncclResult_t SimNccl::redOpDestroy(ncclRedOp_t op, ncclComm_t comm) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  std::shared_ptr<Comm> c;
  if (const ncclResult_t r = impl_->usableLocked(comm, c, "ncclRedOpDestroy"); r != ncclSuccess) {
    return r;
  }
  if (c->redOps.erase(static_cast<int>(op)) == 0) {
    return impl_->failLocked(
        c.get(), ncclInvalidArgument,
        "ncclRedOpDestroy: unknown reduce op " + std::to_string(static_cast<int>(op)));
  }
  return ncclSuccess;
}

void SimNccl::setInitDelay(std::chrono::microseconds delay) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->initDelay = delay;
}

void SimNccl::setLaunchOrderImplicit(bool implicit) {
  impl_->launchOrderImplicit.store(implicit);
}

void SimNccl::setGroupEndDelay(std::chrono::microseconds delay) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->groupEndDelay = delay;
}

void SimNccl::setGroupEndDelay(ncclComm_t comm, std::chrono::microseconds delay) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto c = impl_->findLocked(comm);
  if (!c) {
    throw std::invalid_argument("SimNccl::setGroupEndDelay: unknown communicator");
  }
  c->groupEndDelay = delay;
}

void SimNccl::blockCalls(Call call, std::chrono::milliseconds howLong) {
  impl_->gate.block(static_cast<int>(call), howLong);
}

void SimNccl::releaseBlockedCalls() {
  impl_->gate.releaseAll();
}

int SimNccl::blockedCalls() const {
  return impl_->gate.blocked();
}

int SimNccl::stackSlotWindows() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->stackSlotWindows;
}

void SimNccl::setCommMemory(int64_t creationBytes, int64_t firstUseBytes) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->creationBytes = creationBytes;
  impl_->firstUseBytes = firstUseBytes;
}

void SimNccl::setCollectiveDuration(std::chrono::microseconds duration) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->collectiveDuration = duration;
}

void SimNccl::injectAsyncError(ncclComm_t comm, ncclResult_t error, std::string message) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto c = impl_->findLocked(comm);
  if (!c) {
    throw std::invalid_argument("SimNccl::injectAsyncError: unknown communicator");
  }
  c->asyncError = error;
  c->injected = true;
  c->lastError = std::move(message);
  impl_->cv.notify_all();
}

int SimNccl::liveComms() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return static_cast<int>(impl_->live.size());
}

ncclResult_t SimNccl::memAlloc(void** ptr, size_t size) {
  if (ptr == nullptr) {
    return ncclInvalidArgument;
  }
  // SimGpu first: its locks are never taken under ours.
  const int device = impl_->gpu->currentDevice();
  void* block = impl_->gpu->allocateBlock(
      impl_->gpu->legacyStreamOf(device), std::max<size_t>(size, 1), SimGpu::MemoryKind::Vmm);
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->memAllocs.insert(block);
  *ptr = block;
  return ncclSuccess;
}

ncclResult_t SimNccl::memFree(void* ptr) {
  if (ptr == nullptr) {
    return ncclSuccess;
  }
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    if (impl_->memAllocs.erase(ptr) == 0) {
      return ncclInvalidArgument;
    }
  }
  impl_->gpu->freeBlock(ptr);
  return ncclSuccess;
}

int SimNccl::liveMemAllocs() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return static_cast<int>(impl_->memAllocs.size());
}

int SimNccl::liveRegistrations() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return static_cast<int>(impl_->registrations.size());
}

int SimNccl::liveReduceOps() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  size_t ops = 0;
  for (const auto& [handle, comm] : impl_->live) {
    ops += comm->redOps.size();
  }
  return static_cast<int>(ops);
}

int SimNccl::leakedComms() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->leaked;
}

int SimNccl::overlapViolations() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->overlaps;
}

uint64_t SimNccl::idOf(ncclComm_t comm) const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto c = impl_->findLocked(comm);
  return c ? c->id : 0;
}

int SimNccl::deviceOf(ncclComm_t comm) const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto c = impl_->findLocked(comm);
  return c ? c->device : -1;
}

bool SimNccl::isBlocking(ncclComm_t comm) const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto c = impl_->findLocked(comm);
  return c && c->blocking;
}

std::vector<ncclComm_t> SimNccl::commsOn(int device) const {
  std::vector<std::pair<uint64_t, ncclComm_t>> found;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    for (const auto& [ptr, c] : impl_->live) {
      if (c->device == device) {
        found.emplace_back(c->id, reinterpret_cast<ncclComm_t>(ptr));
      }
    }
  }
  std::sort(found.begin(), found.end());
  std::vector<ncclComm_t> out;
  for (const auto& entry : found) {
    out.push_back(entry.second);
  }
  return out;
}

} // namespace pycomm::sim
