// Output and scratch allocation shared by every op. Tests switch on NaN-poisoning
// (pyfast._C.set_poison_outputs) so that an output element a kernel forgets to write shows up as NaN
// instead of stale memory.
#pragma once
#include <ATen/ATen.h>
#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <new>

namespace pyfast {

bool& poison_outputs();  // defined in csrc/module.cpp

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(sizes, opts);
  if (poison_outputs() && at::isFloatingType(t.scalar_type())) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

// A zero-filled fp32 scratch buffer of n floats for one thread of a CPU kernel, freed with it.
// From 2 MiB on it is a private anonymous mapping, 2-MiB aligned, that asks for transparent huge
// pages (madvise; a hint, 4-KiB pages where THP is off): the kernel hands it over zero-filled, so
// there is no memset pass over it (a second zeroing, ~1.5% of the Hedgehog backward). The Hedgehog
// backward walks an ~8 MiB scratch per thread at T = 8k (the chunk states it keeps), and with 4-KiB
// pages its forward+backward took ~10% longer on the 2-core VM (page faults on every call, TLB
// misses). Outputs stay torch tensors: the same for them measured slower (the Hedgehog forward's
// 16 MiB output).
class ZeroScratch {
#ifdef __SANITIZE_ADDRESS__
  static constexpr bool kHeapOnly = true;  // ASan (scripts/sanitize.sh): the heap, where it catches overruns
#else
  static constexpr bool kHeapOnly = false;
#endif

 public:
  explicit ZeroScratch(int64_t n) {
    constexpr size_t kHuge = size_t{2} << 20;
    const size_t bytes = static_cast<size_t>(n > 0 ? n : 1) * sizeof(float);
    if (bytes < kHuge || kHeapOnly) {
      void* p = std::calloc(bytes, 1);
      if (p == nullptr) throw std::bad_alloc();
      p_ = static_cast<float*>(p);
      return;
    }
    len_ = (bytes + kHuge - 1) / kHuge * kHuge + kHuge;  // room to align the start to 2 MiB
    base_ = mmap(nullptr, len_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base_ == MAP_FAILED) throw std::bad_alloc();
    const uintptr_t at = (reinterpret_cast<uintptr_t>(base_) + kHuge - 1) & ~uintptr_t{kHuge - 1};
    p_ = reinterpret_cast<float*>(at);
#ifdef MADV_HUGEPAGE
    madvise(p_, len_ - kHuge, MADV_HUGEPAGE);
#endif
  }
  ~ZeroScratch() {
    if (base_ != nullptr) munmap(base_, len_);
    else std::free(p_);
  }
  ZeroScratch(const ZeroScratch&) = delete;
  ZeroScratch& operator=(const ZeroScratch&) = delete;
  float* data() const { return p_; }

 private:
  float* p_ = nullptr;
  void* base_ = nullptr;  // the mapping (large buffers), else p_ is from calloc
  size_t len_ = 0;
};

}  // namespace pyfast
