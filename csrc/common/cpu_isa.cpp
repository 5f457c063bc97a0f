// Runtime CPU feature detection (declared in common/cpu_isa.h).
#include "common/cpu_isa.h"

namespace pyfast {

bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

bool cpu_has_avx512_vnni() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool ok =
      cpu_has_avx512() && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi");
  return ok;
#else
  return false;
#endif
}

int& cpu_isa_cap() {
  static int cap = kIsaAvx512Vnni;
  return cap;
}

}  // namespace pyfast
