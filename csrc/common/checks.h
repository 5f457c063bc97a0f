// Argument checks shared by every op's CPU and CUDA host code. Messages follow
// "pyfast.<op>: expected <argument> <what>, got <what>", like the Python-side checks
// in pyfast/_validate.py, and run before any kernel is launched.
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>

#include <initializer_list>
#include <sstream>
#include <string>

namespace pyfast {

inline std::string shape_str(at::IntArrayRef s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << "]";
  return o.str();
}

// Expect `t` to have exactly the sizes in `shape`; -1 means any size.
inline void check_shape(const char* op, const char* arg, const at::Tensor& t, std::initializer_list<int64_t> shape) {
  bool ok = t.dim() == static_cast<int64_t>(shape.size());
  std::ostringstream want;
  want << "[";
  int64_t i = 0;
  for (int64_t s : shape) {
    want << (i ? ", " : "") << (s < 0 ? std::string("*") : std::to_string(s));
    if (ok && s >= 0 && t.size(i) != s) ok = false;
    ++i;
  }
  want << "]";
  TORCH_CHECK(ok, "pyfast.", op, ": expected ", arg, " shape ", want.str(), ", got shape ", shape_str(t.sizes()));
}

inline void check_dtype(const char* op, const char* arg, const at::Tensor& t, at::ScalarType want) {
  TORCH_CHECK(t.scalar_type() == want, "pyfast.", op, ": expected ", arg, " dtype ", want, ", got ", t.scalar_type());
}

inline void check_float_dtype(const char* op, const char* arg, const at::Tensor& t) {
  auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kHalf || d == at::kBFloat16, "pyfast.", op, ": expected ", arg,
              " dtype float32, float16 or bfloat16, got ", d);
}

// `ref_arg` names the tensor whose device every other argument must share (e.g. "x", "k_cache").
inline void check_same_device(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& ref,
                              const char* ref_arg) {
  TORCH_CHECK(t.device() == ref.device(), "pyfast.", op, ": expected ", arg, " on ", ref.device(), " (the device of ",
              ref_arg, "), got ", t.device());
}

// Only the last dim needs stride 1 (DESIGN.md); anything else is copied once.
inline at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

}  // namespace pyfast
