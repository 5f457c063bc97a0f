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
  if (pyfast::cpu_has_avx512_vnni()) return "avx512_vnni";
  if (pyfast::cpu_has_avx512()) return "avx512";
  if (pyfast::cpu_has_avx2()) return "avx2";
  return "scalar";
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyfast compiled kernels (ops are under torch.ops.pyfast)";
  m.def("set_poison_outputs", [](bool on) { pyfast::poison_outputs() = on; },
        "Fill every op output with NaN before the kernel writes it (for tests).");
  m.def("set_cpu_isa", [](const std::string& isa) {
        using namespace pyfast;
        int cap = kIsaAvx512Vnni;  // "auto": the best this CPU runs
        if (isa == "scalar") cap = kIsaScalar;
        else if (isa == "avx512") cap = kIsaAvx512;
        else TORCH_CHECK(isa == "auto" || isa == "avx512_vnni",
                         "pyfast.set_cpu_isa: expected isa 'auto', 'scalar', 'avx512' or 'avx512_vnni', got '", isa, "'");
        TORCH_CHECK(isa != "avx512" || cpu_has_avx512(), "pyfast.set_cpu_isa: this CPU has no AVX-512");
        TORCH_CHECK(isa != "avx512_vnni" || cpu_has_avx512_vnni(), "pyfast.set_cpu_isa: this CPU has no AVX-512 VNNI/VBMI");
        cpu_isa_cap() = cap;
      },
      "Cap the CPU kernels: 'auto' (the best this CPU runs), 'scalar' (portable), 'avx512' (no VNNI), "
      "'avx512_vnni' (for tests).");
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
