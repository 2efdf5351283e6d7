#include "hugepages.h"

#include <cstdint>

#ifdef __linux__
#include <sys/mman.h>
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25  // Linux 6.1; older headers lack the name
#endif
#endif

namespace mmt {

size_t advise_hugepages(const std::vector<mx::array>& arrays) {
  size_t collapsed = 0;
#ifdef __linux__
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  for (const auto& a : arrays) {
    if (a.data_shared_ptr() == nullptr || a.nbytes() < kHuge) continue;
    const auto begin = reinterpret_cast<uintptr_t>(a.data<char>());
    const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = (begin + a.nbytes()) & ~(kHuge - 1);
    if (hi <= lo) continue;
    void* p = reinterpret_cast<void*>(lo);
    // only whole 2 MB blocks inside this array's own buffer: what lies around it is left as it is
    if (madvise(p, hi - lo, MADV_HUGEPAGE) != 0) continue;
    if (madvise(p, hi - lo, MADV_COLLAPSE) == 0) collapsed += hi - lo;
  }
#else
  (void)arrays;
#endif
  return collapsed;
}

}  // namespace mmt
