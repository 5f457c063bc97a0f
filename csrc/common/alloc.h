// Output allocation shared by every op. Tests switch on NaN-poisoning (pyfast._C.set_poison_outputs)
// so that an output element a kernel forgets to write shows up as NaN instead of stale memory.
#pragma once
#include <ATen/ATen.h>

#include <limits>

namespace pyfast {

bool& poison_outputs();  // defined in csrc/module.cpp

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(sizes, opts);
  if (poison_outputs() && at::isFloatingType(t.scalar_type())) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

}  // namespace pyfast
