// The choice of the hot loops' ISA at run time (isa.h).

#include "isa.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace sage_dist {
namespace cpu {
namespace {

bool cpu_has(const char* isa) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  // __builtin_cpu_supports also requires the OS to save the vector registers (XCR0).
  if (std::strcmp(isa, "avx512") == 0) return __builtin_cpu_supports("avx512f");
  if (std::strcmp(isa, "avx2") == 0) return __builtin_cpu_supports("avx2");
#endif
  return std::strcmp(isa, "generic") == 0;
}

// The set for `name`, or null when unknown, not compiled in or not supported by this CPU.
const Kernels* lookup(const char* name) {
  if (std::strcmp(name, "auto") == 0) {
    for (const char* isa : {"avx512", "avx2"})
      if (const Kernels* k = lookup(isa)) return k;
    return kernels_generic();
  }
  const Kernels* k = std::strcmp(name, "avx512") == 0 ? kernels_avx512()
                     : std::strcmp(name, "avx2") == 0 ? kernels_avx2()
                     : std::strcmp(name, "generic") == 0 ? kernels_generic()
                                                         : nullptr;
  return k && cpu_has(name) ? k : nullptr;
}

const Kernels* initial() {
  const char* env = std::getenv("SAGE_DIST_CPU_ISA");
  const Kernels* k = env && *env ? lookup(env) : nullptr;
  return k ? k : lookup("auto");
}

std::atomic<const Kernels*> active{nullptr};

}  // namespace

const Kernels& kernels() {
  const Kernels* k = active.load(std::memory_order_acquire);
  if (!k) {
    k = initial();
    active.store(k, std::memory_order_release);
  }
  return *k;
}

}  // namespace cpu
}  // namespace sage_dist

extern "C" const char* sage_dist_cpu_isa() { return sage_dist::cpu::kernels().name; }

extern "C" int sage_dist_set_cpu_isa(const char* name) {
  const sage_dist::cpu::Kernels* k = name ? sage_dist::cpu::lookup(name) : nullptr;
  if (!k) return -1;
  sage_dist::cpu::active.store(k, std::memory_order_release);
  return 0;
}
