// Helpers shared by the primitives' eval_cpu.
#pragma once

#include <vector>

#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"

namespace mmt {

namespace mx = mlx::core;

// The inputs, each row-contiguous: a strided one is replaced by a copy made on the stream (after whatever
// computes it). The primitives then read plain row-major buffers. (libmlx does not export its own copy.)
std::vector<mx::array> row_contiguous_inputs(const std::vector<mx::array>& inputs, mx::cpu::CommandEncoder& enc);

}  // namespace mmt
