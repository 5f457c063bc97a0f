// The element types the CPU kernels read and write, shared by every family: fp32, or fp16/bf16
// handled as raw 16-bit words (the per-ISA units convert them, see cpu_vec16_*.h load/store).
// Torch-free, no functions: safe to include from the units compiled under an ISA target pragma.
#pragma once
#include <cstdint>

namespace pyfast {

enum class Elem : int32_t { kF32, kF16, kBF16 };

// The C++ type an element of type E is stored as.
template <Elem E> struct ElemT { using T = uint16_t; };
template <> struct ElemT<Elem::kF32> { using T = float; };

}  // namespace pyfast
