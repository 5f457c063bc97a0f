// pyfast._C: the compiled extension. Importing it runs the TORCH_LIBRARY registrations of every
// source linked in; the pybind11 module itself only reports how it was built.
#include <torch/extension.h>

#include <string>

#ifndef PYFAST_VERSION
#define PYFAST_VERSION "0.0.0"
#endif
#ifndef PYFAST_CUDA_ARCH_LIST
#define PYFAST_CUDA_ARCH_LIST ""
#endif

#include "common/cpu_isa.h"

namespace pyfast {
bool& poison_outputs() {
  static bool poison = false;
  return poison;
}
}  // namespace pyfast

static std::string cpu_isa() {
  if (pyfast::cpu_has_avx512()) return "avx512";
  if (pyfast::cpu_has_avx2()) return "avx2";
  return "scalar";
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyfast compiled kernels (ops are under torch.ops.pyfast)";
  m.def("set_poison_outputs", [](bool on) { pyfast::poison_outputs() = on; },
        "Fill every op output with NaN before the kernel writes it (for tests).");
  m.def("set_cpu_isa", [](const std::string& isa) {
        TORCH_CHECK(isa == "auto" || isa == "scalar" || isa == "avx512",
                    "pyfast.set_cpu_isa: expected isa 'auto', 'scalar' or 'avx512', got '", isa, "'");
        TORCH_CHECK(isa != "avx512" || pyfast::cpu_has_avx512(), "pyfast.set_cpu_isa: this CPU has no AVX-512");
        pyfast::cpu_force_scalar() = isa == "scalar";
      },
      "Pick the CPU kernels: 'auto' (the best this CPU runs), 'scalar' (portable) or 'avx512' (for tests).");
  m.def("build_info", []() {
    pybind11::dict info;
    info["version"] = PYFAST_VERSION;
    info["torch_version"] = TORCH_VERSION;
#ifdef PYFAST_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
    info["cuda_arch_list"] = PYFAST_CUDA_ARCH_LIST;
    info["cpu_isa"] = cpu_isa();
    return info;
  });
}
