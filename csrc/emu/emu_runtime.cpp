// The CUDA emulation's runtime (model: csrc/emu/emu.h): fibers, the block scheduler, warp
// operations, emulated shared memory, launches, and the fault handler that turns an access to a
// guard page into a kernel error. Single-threaded: one launch at a time, blocks in grid order.
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "emu.h"
#include "emu_runtime.h"

#if !defined(__x86_64__)
#error "the CUDA emulation's fiber switch is written for x86-64"
#endif

// switch(save, to): push the callee-saved registers, MXCSR and the x87 control word on this stack,
// store the stack pointer in *save, load `to` and pop the same from there. A new fiber's stack is
// laid out as if it had switched away just before pyfast_emu_trampoline, which calls r13(r12).
extern "C" void pyfast_emu_switch(void** save, void* to);
extern "C" void pyfast_emu_trampoline();
asm(R"(
  .text
  .p2align 4
  .globl pyfast_emu_switch
  .hidden pyfast_emu_switch
  .type pyfast_emu_switch,@function
pyfast_emu_switch:
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
  .size pyfast_emu_switch, .-pyfast_emu_switch
  .p2align 4
  .globl pyfast_emu_trampoline
  .hidden pyfast_emu_trampoline
  .type pyfast_emu_trampoline,@function
pyfast_emu_trampoline:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size pyfast_emu_trampoline, .-pyfast_emu_trampoline
)");

namespace pyfast_emu {
namespace {

constexpr size_t kPage = 4096;
constexpr size_t kStackBytes = 256 * 1024;  // per emulated thread (kernels keep small frames)
constexpr int kMaxThreads = 1024;
constexpr size_t kArenaBytes = 256 * 1024;  // emulated shared memory; an inaccessible page follows
constexpr size_t kRedzone = 32;             // poisoned gap after each __shared__ variable
constexpr size_t kAltStackBytes = 64 * 1024;

enum class State { kRun, kBarrier, kWarp, kDone };

struct Fiber {
  void* sp = nullptr;
  char* map = nullptr;  // [guard page][kStackBytes of stack]
  uint3 tid{};
  State state = State::kDone;
  WarpOp op{};
  unsigned mask = 0;
  int arg = 0, width = 32;
  uint64_t payload = 0, result = 0;
};

struct SharedVar {
  char* p;
  size_t bytes;
  const char* name;
};

struct Emu {
  Settings settings;
  Stats stats;
  std::string error;  // the first kernel error since take_error()
  cudaError_t last_error = cudaSuccess;

  // The launch in progress.
  const char* kernel = "";
  dim3 grid, block;
  uint3 bidx{};
  const std::function<void()>* body = nullptr;
  std::vector<Fiber> fibers = std::vector<Fiber>(kMaxThreads);
  uint64_t gathered[kMaxThreads / 32][32] = {};  // per warp: the payloads of its last kGather
  Fiber* cur = nullptr;
  void* sched_sp = nullptr;
  bool aborting = false;

  // Shared memory: static variables from the arena's start, the dynamic part ending at its end.
  char* arena = nullptr;
  char* dyn = nullptr;
  size_t dyn_bytes = 0, static_used = 0;
  uint64_t block_serial = 0;
  std::vector<SharedVar> vars;

  std::map<uintptr_t, std::pair<size_t, std::string>> guards;  // lo -> (bytes, what)
  sigjmp_buf fault_jmp;
  volatile sig_atomic_t in_launch = 0;
  volatile uintptr_t fault_addr = 0;
  char* alt_stack = nullptr;
};

Emu& E() {
  static Emu e;
  return e;
}

char* map_guarded(size_t bytes, bool guard_low) {
  void* m = mmap(nullptr, bytes + kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) {
    std::perror("pyfast_emu: mmap");
    std::abort();
  }
  char* c = static_cast<char*>(m);
  mprotect(guard_low ? c : c + bytes, kPage, PROT_NONE);
  return c;
}

std::string where() {
  const Emu& e = E();
  char buf[160];
  if (e.cur != nullptr) {
    std::snprintf(buf, sizeof buf, " (block (%u, %u, %u), thread (%u, %u, %u))", e.bidx.x, e.bidx.y, e.bidx.z,
                  e.cur->tid.x, e.cur->tid.y, e.cur->tid.z);
  } else {
    std::snprintf(buf, sizeof buf, " (block (%u, %u, %u))", e.bidx.x, e.bidx.y, e.bidx.z);
  }
  return std::string(e.kernel) + buf;
}

void record(const std::string& msg) {
  Emu& e = E();
  if (e.error.empty()) e.error = msg;
}

// An error inside a fiber: record it and return to the scheduler for good (the block is abandoned).
[[noreturn]] void fiber_fail(const std::string& msg) {
  Emu& e = E();
  record(msg + " in " + where());
  e.aborting = true;
  e.cur->state = State::kDone;
  pyfast_emu_switch(&e.cur->sp, e.sched_sp);
  __builtin_unreachable();
}

void block_on(State s) {
  Emu& e = E();
  e.cur->state = s;
  pyfast_emu_switch(&e.cur->sp, e.sched_sp);
}

void fiber_main(Fiber* f) {
  (*E().body)();
  f->state = State::kDone;
  pyfast_emu_switch(&f->sp, E().sched_sp);
  __builtin_unreachable();
}

void start_fiber(Fiber& f) {
  if (f.map == nullptr) f.map = map_guarded(kStackBytes, /*guard_low=*/true);
  const uintptr_t top = (reinterpret_cast<uintptr_t>(f.map) + kPage + kStackBytes - 16) & ~uintptr_t{15};
  auto* sp = reinterpret_cast<uint64_t*>(top - 64);
  sp[0] = 0x1F80u | (uint64_t{0x037F} << 32);  // MXCSR (no flush-to-zero), x87 control word
  sp[1] = sp[2] = 0;                            // r15, r14
  sp[3] = reinterpret_cast<uint64_t>(&fiber_main);  // r13
  sp[4] = reinterpret_cast<uint64_t>(&f);           // r12
  sp[5] = sp[6] = 0;                                // rbx, rbp
  sp[7] = reinterpret_cast<uint64_t>(&pyfast_emu_trampoline);
  f.sp = sp;
  f.state = State::kRun;
}

// ---- shared memory ----

void reset_shared() {
  Emu& e = E();
  if (e.arena == nullptr) e.arena = map_guarded(kArenaBytes, /*guard_low=*/false);
  ++e.block_serial;
  std::memset(e.dyn, e.settings.shared_poison, e.arena + kArenaBytes - e.dyn);  // static: in shared_alloc
  e.static_used = 0;
  e.vars.clear();
}

bool poisoned(const char* lo, const char* hi) {
  const unsigned char p = E().settings.shared_poison;
  for (const char* c = lo; c < hi; ++c)
    if (static_cast<unsigned char>(*c) != p) return false;
  return true;
}

// After a block: the gaps after every __shared__ variable and after the dynamic part are intact.
void check_shared_gaps() {
  Emu& e = E();
  for (const SharedVar& v : e.vars) {
    if (!poisoned(v.p + v.bytes, v.p + v.bytes + kRedzone)) {
      record("out-of-bounds shared-memory write just past __shared__ " + std::string(v.name) + " (" +
             std::to_string(v.bytes) + " bytes) in " + where());
      return;
    }
  }
  if (!poisoned(e.dyn + e.dyn_bytes, e.arena + kArenaBytes))
    record("out-of-bounds write past the dynamic shared memory (" + std::to_string(e.dyn_bytes) + " bytes) in " +
           where());
}

// ---- warp operations ----

// Releases every warp whose waiting lanes form complete groups; false if none could be released.
bool release_warps(int n) {
  Emu& e = E();
  bool released = false;
  for (int w0 = 0; w0 < n; w0 += 32) {
    const int lanes = std::min(32, n - w0);
    for (int l = 0; l < lanes; ++l) {
      Fiber& f = e.fibers[w0 + l];
      if (f.state != State::kWarp) continue;
      const unsigned mask = f.mask;
      if (!(mask >> l & 1u)) {
        e.cur = &f;
        record("warp operation whose mask 0x" + [&] { char b[16]; std::snprintf(b, sizeof b, "%08x", mask); return std::string(b); }() +
               " leaves out the calling lane in " + where());
        return false;
      }
      bool complete = true;
      for (int m = 0; m < 32; ++m) {
        if (!(mask >> m & 1u)) continue;
        if (m >= lanes || e.fibers[w0 + m].state == State::kDone) {
          e.cur = &f;
          record("warp operation with lane " + std::to_string(m) + " in its mask, which has exited or does not exist, in " +
                 where());
          return false;
        }
        if (e.fibers[w0 + m].state != State::kWarp) complete = false;
      }
      if (!complete) continue;
      for (int m = 0; m < 32; ++m) {
        if (!(mask >> m & 1u)) continue;
        const Fiber& g = e.fibers[w0 + m];
        if (g.op != f.op || g.mask != mask || g.width != f.width) {
          e.cur = &f;
          record("lanes " + std::to_string(l) + " and " + std::to_string(m) +
                 " of a warp meet at different warp operations (or masks) in " + where());
          return false;
        }
      }
      if (f.op == WarpOp::kGather) {
        uint64_t* all = e.gathered[w0 / 32];
        for (int m = 0; m < 32; ++m) all[m] = (mask >> m & 1u) ? e.fibers[w0 + m].payload : 0;
      }
      uint64_t ballot = 0;
      for (int m = 0; m < 32; ++m)
        if ((mask >> m & 1u) && e.fibers[w0 + m].payload != 0) ballot |= uint64_t{1} << m;
      for (int m = 0; m < 32; ++m) {
        if (!(mask >> m & 1u)) continue;
        Fiber& g = e.fibers[w0 + m];
        const int width = g.width, seg = m & ~(width - 1), pos = m & (width - 1);
        int src = m;
        switch (g.op) {
          case WarpOp::kShflIdx: src = seg + (g.arg & (width - 1)); break;
          case WarpOp::kShflUp: src = pos - g.arg >= 0 ? m - g.arg : m; break;
          case WarpOp::kShflDown: src = pos + g.arg < width ? m + g.arg : m; break;
          case WarpOp::kShflXor: src = ((m ^ g.arg) & ~(width - 1)) == seg ? (m ^ g.arg) : m; break;
          default: break;
        }
        if (src < 0 || src >= 32 || !(mask >> src & 1u)) {
          e.cur = &g;
          record("shuffle reads lane " + std::to_string(src) + ", outside the mask, in " + where());
          return false;
        }
        g.result = g.op == WarpOp::kBallot   ? ballot
                   : g.op == WarpOp::kGather ? reinterpret_cast<uint64_t>(e.gathered[w0 / 32])
                                             : e.fibers[w0 + src].payload;
      }
      for (int m = 0; m < 32; ++m)
        if (mask >> m & 1u) e.fibers[w0 + m].state = State::kRun;
      ++e.stats.warp_ops;
      released = true;
    }
  }
  return released;
}

// ---- blocks ----

bool run_block() {
  Emu& e = E();
  const int n = static_cast<int>(e.block.x * e.block.y * e.block.z);
  reset_shared();
  for (int i = 0; i < n; ++i) {
    Fiber& f = e.fibers[i];
    f.tid = {i % e.block.x, (i / e.block.x) % e.block.y, i / (e.block.x * e.block.y)};
    start_fiber(f);
  }
  const bool rev = e.settings.reverse_order;
  for (;;) {
    for (int k = 0; k < n; ++k) {
      Fiber& f = e.fibers[rev ? n - 1 - k : k];
      if (f.state != State::kRun) continue;
      e.cur = &f;
      pyfast_emu_switch(&e.sched_sp, f.sp);
      e.cur = nullptr;
      if (e.aborting) return false;
    }
    int live = 0, at_barrier = 0;
    for (int i = 0; i < n; ++i) {
      live += e.fibers[i].state != State::kDone;
      at_barrier += e.fibers[i].state == State::kBarrier;
    }
    if (live == 0) break;
    if (release_warps(n)) continue;
    if (!e.error.empty()) return false;
    if (at_barrier == live) {
      for (int i = 0; i < n; ++i)
        if (e.fibers[i].state == State::kBarrier) e.fibers[i].state = State::kRun;
      ++e.stats.barriers;
      continue;
    }
    record("deadlock: " + std::to_string(at_barrier) + " of " + std::to_string(live) +
           " live threads wait at __syncthreads, the others at a warp operation whose lanes never arrive, in " +
           where());
    return false;
  }
  check_shared_gaps();
  return e.error.empty();
}

std::string describe_fault(uintptr_t addr) {
  Emu& e = E();
  char buf[64];
  std::snprintf(buf, sizeof buf, "0x%lx", static_cast<unsigned long>(addr));
  auto it = e.guards.upper_bound(addr);
  if (it != e.guards.begin()) {
    --it;
    if (addr < it->first + it->second.first) return "illegal address " + std::string(buf) + ": " + it->second.second;
  }
  const auto arena_end = reinterpret_cast<uintptr_t>(e.arena) + kArenaBytes;
  if (e.arena != nullptr && addr >= arena_end && addr < arena_end + kPage)
    return "shared-memory access past the end of the dynamic shared memory (" + std::to_string(e.dyn_bytes) + " bytes)";
  for (const Fiber& f : e.fibers) {
    const auto lo = reinterpret_cast<uintptr_t>(f.map);
    if (f.map != nullptr && addr >= lo && addr < lo + kPage) return "stack overflow of an emulated thread";
  }
  return "illegal address " + std::string(buf);
}

void on_fault(int sig, siginfo_t* info, void*) {
  Emu& e = E();
  if (!e.in_launch) {  // not ours: the default action
    signal(sig, SIG_DFL);
    raise(sig);
    return;
  }
  e.fault_addr = reinterpret_cast<uintptr_t>(info->si_addr);
  siglongjmp(e.fault_jmp, 1);
}

bool valid_config(const LaunchConfig& c) {
  const uint64_t threads = uint64_t{c.block.x} * c.block.y * c.block.z;
  return threads >= 1 && threads <= kMaxThreads && c.block.z <= 64 && c.grid.x >= 1 && c.grid.x <= 0x7FFFFFFFu &&
         c.grid.y >= 1 && c.grid.y <= 65535 && c.grid.z >= 1 && c.grid.z <= 65535;
}

}  // namespace

Settings& settings() { return E().settings; }
Stats& stats() { return E().stats; }

std::string take_error() {
  std::string s;
  s.swap(E().error);
  return s;
}

void report_error(const std::string& msg) { record(msg); }

void add_guard(const void* lo, size_t bytes, const std::string& what) {
  E().guards[reinterpret_cast<uintptr_t>(lo)] = {bytes, what};
}
void remove_guard(const void* lo) { E().guards.erase(reinterpret_cast<uintptr_t>(lo)); }

}  // namespace pyfast_emu

void misaligned_load(const void* p, size_t align) {
  char buf[96];
  std::snprintf(buf, sizeof buf, "misaligned %zu-byte load from %p", align, p);
  pyfast_emu::fiber_fail(buf);
}

namespace pyfast_emu {

const uint3& thread_idx() { return E().cur->tid; }
const uint3& block_idx() { return E().bidx; }
const dim3& block_dim() { return E().block; }
const dim3& grid_dim() { return E().grid; }

void syncthreads() { block_on(State::kBarrier); }

uint64_t warp_op(WarpOp op, unsigned mask, uint64_t payload, int arg, int width) {
  Emu& e = E();
  Fiber& f = *e.cur;
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) fiber_fail("warp operation with width " + std::to_string(width));
  f.op = op, f.mask = mask, f.payload = payload, f.arg = arg, f.width = width;
  block_on(State::kWarp);
  return f.result;
}

// Element (row, col) of the lane-distributed fragments, per the PTX ISA's m16n8k16 layouts
// (g = lane / 4, t = lane % 4; the low half of a 32-bit register holds the lower element index):
//   A 16x16 (row-major), 4 registers x 2 halves: element i = 0..7 of a lane is at
//     row g + 8 * ((i / 2) % 2), col 2t + (i % 2) + 8 * (i / 4)
//   B 16x8 (column-major), 2 registers x 2 halves: element i = 0..3 at row 2t + (i % 2) + 8 * (i / 2), col g
//   C, D 16x8 fp32, 4 floats: element i = 0..3 at row g + 8 * (i / 2), col 2t + (i % 2)
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4], bool bf16) {
  struct Frag {
    uint32_t a[4], b[2];
    float c[4];
  } mine{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}, {c[0], c[1], c[2], c[3]}};
  // Every lane publishes where its fragments are, reads all of them, then waits until every lane has
  // read (its own fragments stay valid on its suspended stack until then).
  const auto* all = reinterpret_cast<const uint64_t*>(warp_op(WarpOp::kGather, 0xFFFFFFFFu,
                                                              reinterpret_cast<uint64_t>(&mine), 0, 32));
  auto half_of = [](uint32_t reg, int hi) { return static_cast<uint16_t>(hi ? reg >> 16 : reg & 0xFFFFu); };
  auto value = [bf16](uint16_t bits) { return bf16 ? u2f(uint32_t{bits} << 16) : half_bits_to_float(bits); };
  float A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const Frag& f = *reinterpret_cast<const Frag*>(all[lane]);
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < 8; ++i)
      A[g + 8 * ((i / 2) % 2)][2 * t + (i % 2) + 8 * (i / 4)] = value(half_of(f.a[i / 2], i % 2));
    for (int i = 0; i < 4; ++i) B[2 * t + (i % 2) + 8 * (i / 2)][g] = value(half_of(f.b[i / 2], i % 2));
  }
  const int lane = static_cast<int>(E().cur - E().fibers.data()) % 32;
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + (i % 2);
    float acc = mine.c[i];
    for (int k = 0; k < 16; ++k) acc = std::fma(A[row][k], B[k][col], acc);  // products exact in fp32
    d[i] = acc;
  }
  warp_op(WarpOp::kSync, 0xFFFFFFFFu, 0, 0, 32);
}

void* dynamic_shared() { return E().dyn; }

void* shared_alloc(SharedSlot& slot, size_t bytes, size_t align, const char* name) {
  Emu& e = E();
  if (slot.block_serial == e.block_serial) return slot.ptr;
  const size_t off = (e.static_used + align - 1) / align * align;
  if (off + bytes + e.dyn_bytes > e.settings.shared_limit) {
    fiber_fail("shared memory over the limit: __shared__ " + std::string(name) + " (" + std::to_string(bytes) +
               " bytes) brings static + dynamic shared memory to " + std::to_string(off + bytes + e.dyn_bytes) +
               " bytes > " + std::to_string(e.settings.shared_limit));
  }
  slot.ptr = e.arena + off;
  slot.block_serial = e.block_serial;
  std::memset(e.arena + e.static_used, e.settings.shared_poison, off + bytes + kRedzone - e.static_used);
  e.vars.push_back({e.arena + off, bytes, name});
  e.static_used = off + bytes + kRedzone;
  return slot.ptr;
}

cudaError_t launch(const LaunchConfig& cfg, const char* kernel, const std::function<void()>& body) {
  Emu& e = E();
  ++e.stats.launches;
  e.kernel = kernel;
  if (!valid_config(cfg) || cfg.smem > e.settings.shared_limit) {
    char buf[256];
    std::snprintf(buf, sizeof buf, "invalid launch of %s: grid (%u, %u, %u), block (%u, %u, %u), %zu bytes of dynamic shared memory",
                  kernel, cfg.grid.x, cfg.grid.y, cfg.grid.z, cfg.block.x, cfg.block.y, cfg.block.z, cfg.smem);
    record(buf);
    return e.last_error = cudaErrorInvalidConfiguration;
  }
  e.grid = cfg.grid;
  e.block = cfg.block;
  e.body = &body;
  e.aborting = false;
  if (e.arena == nullptr) e.arena = map_guarded(kArenaBytes, /*guard_low=*/false);
  e.dyn_bytes = cfg.smem;
  e.dyn = e.arena + ((kArenaBytes - cfg.smem) & ~size_t{15});
  if (e.alt_stack == nullptr) e.alt_stack = static_cast<char*>(std::malloc(kAltStackBytes));

  stack_t alt{}, old_alt{};
  alt.ss_sp = e.alt_stack;
  alt.ss_size = kAltStackBytes;
  sigaltstack(&alt, &old_alt);
  struct sigaction sa {}, old_segv{}, old_bus{};
  sa.sa_sigaction = &on_fault;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &old_segv);
  sigaction(SIGBUS, &sa, &old_bus);

  cudaError_t err = cudaSuccess;
  e.in_launch = 1;
  if (sigsetjmp(e.fault_jmp, 1) != 0) {
    record(describe_fault(e.fault_addr) + " in " + where());
    err = cudaErrorIllegalAddress;
  } else {
    for (unsigned z = 0; z < cfg.grid.z && err == cudaSuccess; ++z)
      for (unsigned y = 0; y < cfg.grid.y && err == cudaSuccess; ++y)
        for (unsigned x = 0; x < cfg.grid.x && err == cudaSuccess; ++x) {
          e.bidx = {x, y, z};
          ++e.stats.blocks;
          e.stats.threads += uint64_t{cfg.block.x} * cfg.block.y * cfg.block.z;
          if (!run_block()) err = cudaErrorLaunchFailure;
        }
  }
  e.in_launch = 0;
  e.cur = nullptr;
  sigaction(SIGSEGV, &old_segv, nullptr);
  sigaction(SIGBUS, &old_bus, nullptr);
  sigaltstack(&old_alt, nullptr);
  if (err != cudaSuccess) e.last_error = err;
  return err;
}

}  // namespace pyfast_emu

cudaError_t cudaGetLastError() {
  const cudaError_t err = pyfast_emu::E().last_error;
  pyfast_emu::E().last_error = cudaSuccess;
  return err;
}
cudaError_t cudaPeekAtLastError() { return pyfast_emu::E().last_error; }

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = pyfast_emu::settings().num_sms;
  return cudaSuccess;
}
