// Output and scratch allocation shared by every op. Tests switch on NaN-poisoning
// (pyfast._C.set_poison_outputs) so that an output element a kernel forgets to write shows up as NaN
// instead of stale memory.
#pragma once
#include <ATen/ATen.h>
#include <sys/mman.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>

namespace pyfast {

bool& poison_outputs();  // defined in csrc/module.cpp

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(sizes, opts);
  if (poison_outputs() && at::isFloatingType(t.scalar_type())) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

// A zero-filled fp32 scratch buffer of n floats for one thread of a CPU kernel, freed with it.
// From 2 MiB on it is 2-MiB aligned and asks for transparent huge pages (madvise; a hint, 4-KiB
// pages where THP is off): the Hedgehog backward walks an ~8 MiB scratch per thread at T = 8k (the
// chunk states it keeps), and with 4-KiB pages its forward+backward took ~10% longer on the 2-core
// VM (page faults on every call, TLB misses). Outputs stay torch tensors: the same for them measured
// slower (the Hedgehog forward's 16 MiB output).
class ZeroScratch {
 public:
  explicit ZeroScratch(int64_t n) {
    constexpr size_t kHuge = size_t{2} << 20;
    const size_t bytes = static_cast<size_t>(n > 0 ? n : 1) * sizeof(float);
    const size_t align = bytes >= kHuge ? kHuge : 64, size = (bytes + align - 1) / align * align;
    void* p = std::aligned_alloc(align, size);
    if (p == nullptr) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
    if (align == kHuge) madvise(p, size, MADV_HUGEPAGE);
#endif
    std::memset(p, 0, bytes);
    p_.reset(static_cast<float*>(p));
  }
  float* data() const { return p_.get(); }

 private:
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float, Free> p_;
};

}  // namespace pyfast
