// A SIMT emulator for running hpckfac's CUDA kernels as host C++ (tests only).
//
// Every CUDA thread of a block is a cooperative fiber on the calling OS
// thread; blocks run one after another. A fiber runs until it reaches a barrier
// (__syncthreads, a warp collective) or returns; the scheduler releases a barrier
// once every thread it concerns has arrived, and reports a launch error for a
// barrier that some threads skip, exit before, or reach at another call site.
// __shared__ variables are thread_local: one instance for the fibers of the block
// being run. See tests/simt/__init__.py for what this model cannot see.
#pragma once
#include <ucontext.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Block scope: one instance per OS thread, i.e. per block being emulated. An
// `extern __shared__` array is defined by the generated launcher unit.
#define __shared__ thread_local

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3() = default;
  constexpr dim3(unsigned x_, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct __attribute__((aligned(16))) float4 {
  float x, y, z, w;
};
struct __attribute__((aligned(16))) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

using std::fmax;
using std::isfinite;
using std::max;
using std::min;
using std::sqrt;

// Host code is compiled with -ffp-contract=off, so these are single roundings as on the GPU.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }

namespace simt {

constexpr unsigned WARP = 32;
constexpr size_t STACK_BYTES = 256 * 1024;

enum class State { runnable, block_wait, warp_wait, done };

// Execution contexts. On x86-64 a switch saves the callee-saved registers and the
// floating-point control words on the old stack and pops them from the new one
// (no system call, unlike swapcontext, which would dominate the run time of the
// kernels' barrier loops); elsewhere ucontext does it.
#if defined(__x86_64__)
extern "C" __attribute__((visibility("hidden"))) void simt_switch_context(void** save, void* load);
asm(R"(
  .text
  .weak simt_switch_context
  .hidden simt_switch_context
  .type simt_switch_context, @function
simt_switch_context:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size simt_switch_context, .-simt_switch_context
)");

struct Context {
  void* sp = nullptr;
};

inline void switch_to(Context& from, Context& to) { simt_switch_context(&from.sp, to.sp); }

// A context that starts `start` (which must never return) on the stack [base, base + bytes).
inline void prepare(Context& c, char* base, size_t bytes, void (*start)()) {
  auto* sp = reinterpret_cast<std::uint64_t*>(reinterpret_cast<std::uintptr_t>(base + bytes) & ~std::uintptr_t(15));
  *--sp = 0;  // where `start` would return to
  *--sp = reinterpret_cast<std::uint64_t>(start);
  for (int i = 0; i < 6; ++i) *--sp = 0;  // rbp, rbx, r12-r15
  std::uint32_t mxcsr;
  std::uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  *--sp = mxcsr | (static_cast<std::uint64_t>(fpucw) << 32);
  c.sp = sp;
}
#else
struct Context {
  ucontext_t uc;
};

inline void switch_to(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

inline void prepare(Context& c, char* base, size_t bytes, void (*start)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = base;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, start, 0);
}
#endif

struct Fiber {
  Context context;
  uint3 idx;
  unsigned linear;
  State state;
  const char* file;
  int line;
};

// State of the launch in progress (one at a time, on one OS thread).
inline Fiber* current = nullptr;
inline uint3 block_idx{0, 0, 0};
inline dim3 block_dim, grid_dim;
inline Context scheduler;
inline std::function<void()> body;
inline std::string error;
inline std::vector<Fiber> fibers;
inline std::vector<unsigned long long> lane_slots;  // one per thread, for warp exchanges
inline bool reverse_order = false;                  // run a block's runnable fibers last to first

// Stacks for the fibers, with a guard page below each (an overflow faults instead of
// overwriting another stack), kept between launches.
inline std::vector<char*> stacks;

inline char* stack_of(size_t i) {
  while (stacks.size() <= i) {
    const long page = 4096;
    void* p = mmap(nullptr, STACK_BYTES + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return nullptr;
    mprotect(p, page, PROT_NONE);
    stacks.push_back(static_cast<char*>(p) + page);
  }
  return stacks[i];
}

inline std::string where(const Fiber& f) {
  return std::string(f.file ? f.file : "?") + ":" + std::to_string(f.line);
}

inline std::string thread_name(const Fiber& f) {
  return "thread (" + std::to_string(f.idx.x) + "," + std::to_string(f.idx.y) + "," + std::to_string(f.idx.z) +
         ")";
}

// Record the first error of the launch and hand control back to the scheduler,
// which abandons the launch (the fiber is never resumed).
[[noreturn]] inline void fail(const std::string& message) {
  if (error.empty()) error = message;
  switch_to(current->context, scheduler);
  __builtin_unreachable();
}

inline void wait(State state, const char* file, int line) {
  current->state = state;
  current->file = file;
  current->line = line;
  switch_to(current->context, scheduler);
}

inline void syncthreads(const char* file, int line) { wait(State::block_wait, file, line); }

inline unsigned lane() { return current->linear % WARP; }

// A warp collective with `mask`: only full warps with every lane taking part are modelled.
inline void check_full_warp(unsigned mask, const char* what) {
  const unsigned threads = block_dim.x * block_dim.y * block_dim.z;
  const unsigned first = current->linear - lane();
  if (mask != 0xffffffffu || first + WARP > threads)
    fail(std::string(what) + ": only full warps with mask 0xffffffff are emulated");
}

inline void syncwarp(unsigned mask, const char* file, int line) {
  check_full_warp(mask, "__syncwarp");
  wait(State::warp_wait, file, line);
}

// Value of `v` held by lane `source(lane)` after every lane of the warp has published
// its own; a lane whose source is outside the warp keeps its own (as shfl.down/up do).
template <typename T, typename F>
T exchange(unsigned mask, T v, F source, const char* what, const char* file, int line) {
  static_assert(sizeof(T) <= sizeof(unsigned long long) && std::is_trivially_copyable_v<T>);
  check_full_warp(mask, what);
  const unsigned first = current->linear - lane();
  const int from = source(static_cast<int>(lane()));
  std::memcpy(&lane_slots[current->linear], &v, sizeof(T));
  wait(State::warp_wait, file, line);
  T out = v;
  if (from >= 0 && from < static_cast<int>(WARP)) std::memcpy(&out, &lane_slots[first + from], sizeof(T));
  wait(State::warp_wait, file, line);  // every lane has read before any slot is reused
  return out;
}

[[noreturn]] inline void entry() {
  body();
  current->state = State::done;
  switch_to(current->context, scheduler);
  __builtin_unreachable();  // a finished fiber is never resumed
}

// Runs one block to completion; false (with `error` set) on a launch error.
inline bool run_block() {
  const size_t n = fibers.size();
  for (size_t i = 0; i < n; ++i) {
    Fiber& f = fibers[i];
    f.state = State::runnable;
    f.file = nullptr;
    f.line = 0;
    char* stack = stack_of(i);
    if (stack == nullptr) {
      error = "out of memory for thread stacks";
      return false;
    }
    prepare(f.context, stack, STACK_BYTES, entry);
  }
  for (;;) {
    for (size_t k = 0; k < n; ++k) {
      Fiber& f = fibers[reverse_order ? n - 1 - k : k];
      if (f.state != State::runnable) continue;
      current = &f;
      switch_to(scheduler, f.context);
      if (!error.empty()) return false;
    }
    // Nothing is runnable now: release whatever barrier is complete.
    size_t done = 0, at_block = 0;
    bool released = false;
    for (const Fiber& f : fibers) {
      done += f.state == State::done;
      at_block += f.state == State::block_wait;
    }
    if (done == n) return true;
    for (size_t w = 0; w < n; w += WARP) {
      const size_t end = std::min(n, w + WARP);
      size_t waiting = 0;
      for (size_t i = w; i < end; ++i) waiting += fibers[i].state == State::warp_wait;
      if (waiting == 0) continue;
      if (waiting == end - w) {
        for (size_t i = w; i < end; ++i) {
          if (fibers[i].line != fibers[w].line || std::strcmp(fibers[i].file, fibers[w].file) != 0) {
            error = "warp " + std::to_string(w / WARP) + ": lanes wait at different warp collectives (" +
                    where(fibers[w]) + ", " + where(fibers[i]) + ")";
            return false;
          }
          fibers[i].state = State::runnable;
        }
        released = true;
      }
    }
    if (released) continue;
    if (at_block == n) {
      for (const Fiber& f : fibers) {
        if (f.line != fibers[0].line || std::strcmp(f.file, fibers[0].file) != 0) {
          error = "threads wait at different __syncthreads (" + where(fibers[0]) + ", " + where(f) + ")";
          return false;
        }
      }
      for (Fiber& f : fibers) f.state = State::runnable;
      continue;
    }
    // A barrier that cannot complete: describe the first thread that waits.
    for (const Fiber& f : fibers) {
      if (f.state == State::block_wait || f.state == State::warp_wait) {
        const char* kind = f.state == State::block_wait ? "__syncthreads" : "a warp collective";
        error = thread_name(f) + " waits at " + kind + " (" + where(f) + ") that not every thread reaches: " +
                std::to_string(done) + " of " + std::to_string(n) + " threads exited, " + std::to_string(at_block) +
                " wait at __syncthreads";
        return false;
      }
    }
    error = "scheduler: no runnable thread";
    return false;
  }
}

// Dynamic shared memory (the `extern __shared__` arrays), set by the launcher unit.
struct Region {
  void* data;
  size_t bytes;
};
inline std::vector<Region> dynamic_shared;

// Kind and size of a kernel parameter as the Python side checks its arguments:
// "s" (scalar) or "p" (pointer), then f (float), h (__half), b (__nv_bfloat16),
// i / u (signed / unsigned integer), v (void), then the size in bytes.
template <typename T>
std::string element_code() {
  using U = std::remove_cv_t<T>;
  if constexpr (std::is_void_v<U>) {
    return "v0";
  } else {
    std::string kind;
    if constexpr (std::is_floating_point_v<U>) kind = "f";
    else if constexpr (std::is_integral_v<U>) kind = std::is_signed_v<U> ? "i" : "u";
    else kind = U::simt_code;
    return kind + std::to_string(sizeof(U));
  }
}

template <typename T>
std::string parameter_code() {
  if constexpr (std::is_pointer_v<T>) return "p" + element_code<std::remove_pointer_t<T>>();
  else return "s" + element_code<T>();
}

template <typename... A>
std::string signature(void (*)(A...)) {
  std::string out;
  ((out += (out.empty() ? "" : ",") + parameter_code<A>()), ...);
  return out;
}

template <typename... A, size_t... I>
std::tuple<A...> unpack_args(void** args, std::index_sequence<I...>) {
  return std::tuple<A...>(*static_cast<A*>(args[I])...);
}

// cuLaunchKernel's contract: `args[i]` points at the value of parameter i.
template <typename... A>
int launch(void (*kernel)(A...), const unsigned* grid, const unsigned* block, size_t shared, void** args, char* message,
           size_t message_size) {
  error.clear();
  const unsigned threads = block[0] * block[1] * block[2];
  size_t available = 0;
  for (const Region& r : dynamic_shared) available = std::max(available, r.bytes);
  if (threads == 0 || threads > 1024 || block[2] > 64 || grid[0] == 0 || grid[1] == 0 || grid[2] == 0)
    error = "invalid launch configuration";
  else if (!dynamic_shared.empty() && shared > available)
    error = "dynamic shared memory of " + std::to_string(shared) + " bytes requested, " + std::to_string(available) +
            " declared";
  if (error.empty()) {
    std::tuple<A...> values = unpack_args<A...>(args, std::index_sequence_for<A...>{});
    body = [&] { std::apply(kernel, values); };
    grid_dim = dim3(grid[0], grid[1], grid[2]);
    block_dim = dim3(block[0], block[1], block[2]);
    fibers.assign(threads, Fiber{});
    lane_slots.assign(threads, 0);
    for (unsigned i = 0; i < threads; ++i)
      fibers[i].idx = {i % block[0], (i / block[0]) % block[1], i / (block[0] * block[1])}, fibers[i].linear = i;
    for (unsigned z = 0; z < grid[2] && error.empty(); ++z)
      for (unsigned y = 0; y < grid[1] && error.empty(); ++y)
        for (unsigned x = 0; x < grid[0] && error.empty(); ++x) {
          block_idx = {x, y, z};
          // Unwritten shared memory reads as NaN (0xff bytes) in every float format.
          for (const Region& r : dynamic_shared) std::memset(r.data, 0xff, r.bytes);
          if (!run_block())
            error = "block (" + std::to_string(x) + "," + std::to_string(y) + "," + std::to_string(z) + "): " + error;
        }
    body = nullptr;
    current = nullptr;
  }
  if (error.empty()) return 0;
  std::snprintf(message, message_size, "%s", error.c_str());
  return 1;
}

}  // namespace simt

#define threadIdx (::simt::current->idx)
#define blockIdx (::simt::block_idx)
#define blockDim (::simt::block_dim)
#define gridDim (::simt::grid_dim)
#define __syncthreads() ::simt::syncthreads(__FILE__, __LINE__)
#define __syncwarp(mask) ::simt::syncwarp((mask), __FILE__, __LINE__)
#define SIMT_SHUFFLE(name, mask, v, source) ::simt::exchange((mask), (v), source, name, __FILE__, __LINE__)
#define __shfl_sync(mask, v, src) SIMT_SHUFFLE("__shfl_sync", mask, v, [&](int) { return static_cast<int>(src) & 31; })
#define __shfl_down_sync(mask, v, delta) \
  SIMT_SHUFFLE("__shfl_down_sync", mask, v, [&](int l) { return l + static_cast<int>(delta); })
#define __shfl_up_sync(mask, v, delta) \
  SIMT_SHUFFLE("__shfl_up_sync", mask, v, [&](int l) { return l - static_cast<int>(delta); })
#define __shfl_xor_sync(mask, v, bits) \
  SIMT_SHUFFLE("__shfl_xor_sync", mask, v, [&](int l) { return l ^ static_cast<int>(bits); })

// Shuffles take no width argument: a call with one fails to compile rather than being
// emulated wrongly.

// Fibers never run at the same time, so read-modify-write is atomic as it stands.
template <typename T>
inline T atomicOr(T* p, T v) {
  const T old = *p;
  *p = old | v;
  return old;
}
template <typename T>
inline T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
