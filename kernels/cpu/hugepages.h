// Weights on 2 MB pages (Linux transparent huge pages). One token's products stream every weight once; with 4 KB
// pages a 126 MB head crosses 31,000 pages per token, each a TLB miss and a stop for the hardware prefetchers.
#pragma once

#include <vector>

#include "mlx/array.h"

namespace mmt {

namespace mx = mlx::core;

// Asks the kernel to back the 2 MB-aligned interior of each array's buffer with huge pages now
// (MADV_HUGEPAGE, then MADV_COLLAPSE: Linux 6.1+; older kernels collapse them later in the background).
// Returns the bytes collapsed now; 0 elsewhere than Linux. The arrays must be evaluated.
size_t advise_hugepages(const std::vector<mx::array>& arrays);

}  // namespace mmt
