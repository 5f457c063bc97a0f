// pyfast_cuda_emu: the CUDA entry points of csrc/kernels.h (the real host files, launchers and device
// code, compiled for the CPU emulation of csrc/emu/emu.h) as a Python module whose functions take
// CPU tensors. Built and loaded by tests/cuda_emu.py; the tests reach it through the op registry
// (pyfast._ops.emulate_cuda). Every call is checked beyond what a GPU would report:
//   * every tensor the call reads or writes, and every tensor it allocates, lives in "guarded"
//     memory: the buffer ends at an inaccessible page (a read or write past the end is an error)
//     and the bytes around it are poisoned and must be intact afterwards;
//   * the call runs twice, with different poison in shared memory and around (and in fresh)
//     buffers: results that differ depend on memory nobody wrote, and are an error;
//   * a kernel error (illegal address, deadlock, divergent warp operation, shared-memory
//     overflow, bad launch) is raised even when the host code did not check for it;
//   * an argument the op does not write (per the registry's schema) must come back unchanged.
#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>
#include <torch/extension.h>

#include <cstring>
#include <map>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "emu/emu_selftest.h"
#include "emu_runtime.h"
#include "kernels.h"

namespace pyfast {
bool& poison_outputs() {  // NaN-filled outputs, as under the tests (csrc/common/alloc.h)
  static bool poison = true;
  return poison;
}
}  // namespace pyfast

namespace {

constexpr size_t kPage = 4096;
constexpr size_t kAlign = 64;  // data alignment of every buffer (like c10's CPU allocator)

// One guarded buffer: [map .. data) poisoned, data .. data+n the buffer, up to the next 64 bytes
// poisoned, then an inaccessible page.
struct Guarded {
  char* map;
  size_t map_bytes;
  char* data;
  size_t n;
  unsigned char poison;
};

std::set<Guarded*>& live() {
  static std::set<Guarded*> s;
  return s;
}

bool intact(const Guarded& g) {
  const char* end = g.data + (g.n + kAlign - 1) / kAlign * kAlign;
  for (const char* c = g.map; c < g.data; ++c)
    if (static_cast<unsigned char>(*c) != g.poison) return false;
  for (const char* c = g.data + g.n; c < end; ++c)
    if (static_cast<unsigned char>(*c) != g.poison) return false;
  return true;
}

std::string overwritten(const Guarded& g) {
  return "out-of-bounds write next to a buffer of " + std::to_string(g.n) + " bytes (its guard bytes changed)";
}

void free_guarded(void* ctx) {
  auto* g = static_cast<Guarded*>(ctx);
  if (!intact(*g)) pyfast_emu::report_error(overwritten(*g));
  live().erase(g);
  pyfast_emu::remove_guard(g->data + (g->n + kAlign - 1) / kAlign * kAlign);
  munmap(g->map, g->map_bytes);
  delete g;
}

struct GuardedAllocator final : c10::Allocator {
  unsigned char poison = 0xA5;

  c10::DataPtr allocate(size_t n) override {
    const c10::Device cpu(c10::DeviceType::CPU);
    if (n == 0) return {nullptr, nullptr, &c10::detail::deleteNothing, cpu};
    const size_t body = (n + kAlign - 1) / kAlign * kAlign;
    const size_t pages = (kAlign + body + kPage - 1) / kPage;  // at least kAlign poisoned bytes before
    const size_t map_bytes = (pages + 1) * kPage;
    void* m = mmap(nullptr, map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(m != MAP_FAILED, "pyfast_cuda_emu: out of memory for a guarded buffer of ", n, " bytes");
    char* map = static_cast<char*>(m);
    char* fence = map + pages * kPage;
    mprotect(fence, kPage, PROT_NONE);
    auto* g = new Guarded{map, map_bytes, fence - body, n, poison};
    std::memset(map, poison, pages * kPage);  // the buffer starts poisoned too (uninitialised)
    live().insert(g);
    pyfast_emu::add_guard(fence, kPage,
                          "past the end of a buffer of " + std::to_string(n) + " bytes (" +
                              std::to_string(body - n) + " bytes of padding, then this page)");
    return {g->data, g, &free_guarded, cpu};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

GuardedAllocator& guarded_allocator() {
  static GuardedAllocator a;
  return a;
}

// While alive, every CPU tensor torch allocates (outputs, workspaces, contiguous copies) is guarded.
struct GuardedScope {
  c10::Allocator* previous;
  explicit GuardedScope(unsigned char poison) : previous(c10::GetCPUAllocator()) {
    guarded_allocator().poison = poison;
    c10::SetCPUAllocator(&guarded_allocator(), /*priority=*/255);
  }
  ~GuardedScope() { c10::SetCPUAllocator(previous, /*priority=*/255); }
};

// The arguments' storages, each copied once into guarded memory (views of one storage stay views of
// one copy), with what the call may do to them.
struct Copies {
  struct Entry {
    c10::Storage original, copy;
    bool written;
  };
  std::map<const void*, Entry> by_data;

  at::Tensor guard(const at::Tensor& t, bool written) {
    if (!t.defined() || t.storage().nbytes() == 0) return t;
    const c10::Storage& s = t.storage();
    auto it = by_data.find(s.data());
    if (it == by_data.end()) {
      c10::Storage copy(c10::Storage::use_byte_size_t(), s.nbytes(), &guarded_allocator(), /*resizable=*/false);
      std::memcpy(copy.mutable_data(), s.data(), s.nbytes());
      it = by_data.emplace(s.data(), Entry{s, copy, written}).first;
    }
    it->second.written = it->second.written || written;
    return at::empty({0}, t.options()).set_(it->second.copy, t.storage_offset(), t.sizes(), t.strides());
  }
};

at::Tensor guard_arg(Copies& c, const at::Tensor& t, bool written) { return c.guard(t, written); }
c10::optional<at::Tensor> guard_arg(Copies& c, const c10::optional<at::Tensor>& t, bool written) {
  if (!t.has_value()) return t;
  return c.guard(*t, written);
}
template <typename T>
T guard_arg(Copies&, const T& v, bool) {
  return v;
}

std::vector<char> bytes_of(const c10::Storage& s) {
  const char* p = static_cast<const char*>(s.data());
  return std::vector<char>(p, p + s.nbytes());
}
std::vector<char> bytes_of(const at::Tensor& t) { return t.defined() ? bytes_of(t.storage()) : std::vector<char>{}; }

void raise_pending(const std::string& context) {
  for (Guarded* g : live())
    if (!intact(*g)) pyfast_emu::report_error(overwritten(*g));
  const std::string err = pyfast_emu::take_error();
  TORCH_CHECK(err.empty(), "pyfast_cuda_emu: ", context, ": ", err);
}

// The checked call of one entry point: two runs with different poison, results compared bitwise,
// the written arguments copied back from the second run, its result returned. `fn` takes the
// guarded arguments and returns the op's results (none for in-place ops).
template <typename F, typename... Args>
std::vector<at::Tensor> call_checked(const char* name, uint64_t written, const F& fn, const Args&... args) {
  std::vector<std::vector<char>> seen[2];
  std::vector<at::Tensor> result[2];
  Copies copies[2];
  const unsigned char shared_poison[2] = {0xFF, 0x7F}, global_poison[2] = {0xA5, 0x5A};
  for (int run = 0; run < 2; ++run) {
    pyfast_emu::take_error();
    cudaGetLastError();  // each call starts clean (a real context would keep a sticky error)
    pyfast_emu::settings().shared_poison = shared_poison[run];
    {
      const GuardedScope scope(global_poison[run]);
      // Braced initialisation evaluates in order, so the i-th argument gets bit i of `written`.
      int i = 0;
      auto guarded = std::tuple<Args...>{guard_arg(copies[run], args, (written >> i++ & 1u) != 0)...};
      try {
        result[run] = std::apply(fn, guarded);
      } catch (const c10::Error& e) {
        const std::string err = pyfast_emu::take_error();
        if (!err.empty()) TORCH_CHECK(false, e.what_without_backtrace(), " [emulation: ", err, "]");
        throw;
      }
    }
    raise_pending(std::string(name) + ": a kernel error the host code did not report");
    for (auto& [data, e] : copies[run].by_data) {
      TORCH_CHECK(e.written || std::memcmp(e.copy.data(), data, e.copy.nbytes()) == 0, "pyfast_cuda_emu: ", name,
                  " wrote to an argument it only reads");
      seen[run].push_back(bytes_of(e.copy));
    }
    for (const at::Tensor& r : result[run]) seen[run].push_back(bytes_of(r));
  }
  TORCH_CHECK(seen[0] == seen[1], "pyfast_cuda_emu: ", name,
              ": the results depend on uninitialised memory (they differ between two runs with different "
              "poison in shared memory and around the buffers)");
  for (auto& [data, e] : copies[1].by_data)
    if (e.written) std::memcpy(e.original.mutable_data(), e.copy.data(), e.copy.nbytes());
  return result[1];
}

// The positions of the tensors op `op` writes, from the registry (one source of truth).
uint64_t written_mask(const std::string& op) {
  namespace py = pybind11;
  const py::object opdef = py::module_::import("pyfast._registry").attr("REGISTRY")[py::str(op)];
  uint64_t mask = 0;
  for (const py::handle i : opdef.attr("written")) mask |= uint64_t{1} << i.cast<int>();
  return mask;
}

// An entry point's result as a list of tensors (void: none; a tuple: its elements).
inline std::vector<at::Tensor> as_list(const at::Tensor& t) { return {t}; }
template <typename... T>
std::vector<at::Tensor> as_list(const std::tuple<T...>& t) {
  return std::apply([](const auto&... x) { return std::vector<at::Tensor>{x...}; }, t);
}

// Binds `fn` as a checked call; `written`: bit i set if argument i is written.
template <typename Ret, typename... Args>
void bind_checked(pybind11::module_& m, const char* name, Ret (*fn)(Args...), uint64_t written) {
  auto run = [fn](std::decay_t<Args>... a) -> std::vector<at::Tensor> {
    if constexpr (std::is_void_v<Ret>) {
      fn(a...);
      return {};
    } else {
      return as_list(fn(a...));
    }
  };
  m.def(name, [name, written, run](std::decay_t<Args>... args) -> pybind11::object {
    std::vector<at::Tensor> out = call_checked(name, written, run, args...);
    if constexpr (std::is_void_v<Ret>) {
      return pybind11::none();
    } else if constexpr (std::is_same_v<Ret, at::Tensor>) {
      return pybind11::cast(out[0]);
    } else {
      pybind11::tuple items(out.size());  // as pybind11 casts the std::tuple of the real module
      for (size_t i = 0; i < out.size(); ++i) items[i] = pybind11::cast(out[i]);
      return items;
    }
  });
}

void selftest(const std::string& name, const at::Tensor& in, const at::Tensor& out, const at::Tensor& a,
              const at::Tensor& b, int64_t n) {
  const cudaError_t err = pyfast_emu_selftest::run(name, in.data_ptr<float>(), out.data_ptr<float>(),
                                                   a.data_ptr<int16_t>(), b.data_ptr<int16_t>(), static_cast<int>(n));
  TORCH_CHECK(err == cudaSuccess, "selftest ", name, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pyfast's CUDA entry points run by the CPU emulation of csrc/emu (tests only)";
#define PYFAST_EMU_BIND(ns, name) \
  bind_checked(m, #name, &pyfast::ns::name, written_mask(std::string(#name).substr(0, std::strlen(#name) - 5)));
  PYFAST_CUDA_ENTRY_POINTS(PYFAST_EMU_BIND)
#undef PYFAST_EMU_BIND
  // The emulation's self-tests (tests/test_cuda_emu.py): case `name` of emu_selftest.cu on `in`
  // (read), `out`, `a`, `b` (written), checked like every entry point.
  bind_checked(m, "selftest", &selftest, 0b11100);
  m.def("configure", [](int num_sms, bool reverse_order) {
        pyfast_emu::settings().num_sms = num_sms;
        pyfast_emu::settings().reverse_order = reverse_order;
      }, "SMs the emulated device reports; run each block's threads last to first.");
  m.def("stats", []() {
    const pyfast_emu::Stats& s = pyfast_emu::stats();
    pybind11::dict d;
    d["launches"] = s.launches, d["blocks"] = s.blocks, d["threads"] = s.threads;
    d["barriers"] = s.barriers, d["warp_ops"] = s.warp_ops;
    return d;
  });
}
