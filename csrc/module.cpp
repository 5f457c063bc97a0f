// pyfast._C: the compiled extension. It holds the kernel entry points (csrc/kernels.h), which the
// op registry (pyfast/_registry.py) calls as the "cpu" / "cuda" implementations of
// torch.ops.pyfast.* after checking every argument, and reports how it was built. The ops' schemas,
// rules, fake impls and autograd live in the registry, not here. These functions do not check
// their arguments: call torch.ops.pyfast.* or pyfast.* instead.
#include <torch/extension.h>

#include <string>

#ifndef PYFAST_VERSION
#define PYFAST_VERSION "0.0.0"
#endif
#ifndef PYFAST_CUDA_ARCH_LIST
#define PYFAST_CUDA_ARCH_LIST ""
#endif

#include "common/cpu_isa.h"
#include "kernels.h"

namespace pyfast {
bool& poison_outputs() {
  static bool poison = false;
  return poison;
}
}  // namespace pyfast

// The level the CPU kernels run at now: the best this CPU has, capped by set_cpu_isa. Only levels
// that have kernels are reported (a CPU without AVX-512 runs the portable kernels: "scalar").
static std::string cpu_isa() {
  if (pyfast::cpu_use_avx512_vnni()) return "avx512_vnni";
  if (pyfast::cpu_use_avx512()) return "avx512";
  return "scalar";
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyfast compiled kernels, unchecked (the checked ops are torch.ops.pyfast.* and pyfast.*)";
  // Kernel entry points: <op>_<backend>, arguments in the op's schema order.
  m.def("cherryq_matmul_cpu", &pyfast::cherryq::cherryq_matmul_cpu);
  m.def("append_kv_cpu", &pyfast::sparse::append_kv_cpu);
  m.def("decode_attention_cpu", &pyfast::sparse::decode_attention_cpu);
  m.def("sparse_decode_attention_cpu", &pyfast::sparse::sparse_decode_attention_cpu);
  m.def("hedgehog_attention_cpu", &pyfast::hedgehog::hedgehog_attention_cpu);
  m.def("linear_attention_cpu", &pyfast::hedgehog::linear_attention_cpu);
  m.def("hedgehog_feature_map_cpu", &pyfast::hedgehog::hedgehog_feature_map_cpu);
  m.def("hedgehog_decode_cpu", &pyfast::hedgehog::hedgehog_decode_cpu);
  m.def("hedgehog_attention_backward_cpu", &pyfast::hedgehog::hedgehog_attention_backward_cpu);
  m.def("linear_attention_backward_cpu", &pyfast::hedgehog::linear_attention_backward_cpu);
  m.def("linear_bias_gelu_cpu", &pyfast::lnfree::linear_bias_gelu_cpu);
  m.def("linear_bias_residual_cpu", &pyfast::lnfree::linear_bias_residual_cpu);
#ifdef PYFAST_WITH_CUDA
#define PYFAST_BIND_CUDA(ns, name) m.def(#name, &pyfast::ns::name);
  PYFAST_CUDA_ENTRY_POINTS(PYFAST_BIND_CUDA)
#undef PYFAST_BIND_CUDA
#endif

  m.def("set_poison_outputs", [](bool on) { pyfast::poison_outputs() = on; },
        "Fill every op output with NaN before the kernel writes it (for tests).");
  m.def("set_hedgehog_backward_block_chunks", [](int64_t n) { pyfast::hedgehog::backward_block_chunks() = n; },
        "Chunks per block of the causal Hedgehog backward's kept states (0, the default: as many as "
        "its per-thread memory budget holds); longer sequences are recomputed from checkpoints "
        "(tests set a few chunks to reach that path).");
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
