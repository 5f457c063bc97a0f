// Host-side controls of the CUDA emulation (csrc/emu/emu.h), used by the emulated extension module
// (emu_module.cpp) around each call: settings, the sticky kernel error, inaccessible guard pages.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace pyfast_emu {

struct Settings {
  int num_sms = 132;               // what cudaDeviceGetAttribute(MultiProcessorCount) reports
  bool reverse_order = false;      // run a block's threads from the last to the first
  unsigned char shared_poison = 0xFF;  // fills shared memory at every block start
  size_t shared_limit = 48 * 1024;     // static + dynamic shared memory of a block, at most
};
Settings& settings();

// The first error a kernel hit since the last take_error() (illegal address, deadlock, divergent
// warp operation, shared-memory overflow, bad launch configuration), with what and where; "" if none.
std::string take_error();
// Records an error found outside a kernel (e.g. a guard region overwritten), unless one is pending.
void report_error(const std::string& msg);

// Memory whose access is an error: a fault inside [lo, hi) is reported as `what` and ends the launch.
void add_guard(const void* lo, size_t bytes, const std::string& what);
void remove_guard(const void* lo);

// Statistics of the emulated launches so far (kernels, blocks, threads, synchronizations).
struct Stats {
  uint64_t launches = 0, blocks = 0, threads = 0, barriers = 0, warp_ops = 0;
};
Stats& stats();

}  // namespace pyfast_emu
