// Python bindings of the native CPU kernels (module mmt_mlx._native); mmt_mlx/native.py is the only user.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>

#include "affine_kernels.h"
#include "affine_primitive.h"
#include "attention.h"
#include "norm_rope.h"
#include "mlx/version.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_native, m) {
  m.doc() = "mmt_mlx native CPU kernels (MLX primitives)";
  m.def("affine_matmul", &mmt::affine_matmul_op, "x"_a, "wq"_a, "scales"_a, "biases"_a, "group_size"_a,
        "bits"_a, nb::kw_only(), "stream"_a = nb::none(),
        "y = x @ W.T for W in MLX's affine layout (f32 result), computed by the native CPU kernel.");
  m.def("affine_dequantize", &mmt::affine_dequantize_op, "wq"_a, "scales"_a, "biases"_a, "group_size"_a,
        "bits"_a, nb::kw_only(), "stream"_a = nb::none(),
        "W (rows, cols) as f32 from MLX's affine layout, by the native CPU kernel (a long prompt's GEMM tile).");
  m.def("rms_norm", &mmt::rms_norm_op, "x"_a, "w"_a, "eps"_a, nb::kw_only(), "stream"_a = nb::none(),
        "x * rsqrt(mean(x^2, -1) + eps) * w in one CPU primitive (f32).");
  m.def("rope", &mmt::rope_op, "x"_a, "offset"_a, "dims"_a, "base"_a, "scale"_a, nb::kw_only(),
        "stream"_a = nb::none(), "Half-split RoPE of x (B, H, T, D) at offset[b] + t in one CPU primitive (f32).");
  m.def("decode_attention", &mmt::decode_attention_op, "q"_a, "k"_a, "v"_a, "scale"_a, "mask"_a = nb::none(),
        nb::kw_only(), "stream"_a = nb::none(),
        "softmax(scale q k^T) v for (B, H, L, D) views, grouped KV heads, bool mask; (B, Lq, Hq * D) f32.");
  m.def("set_num_threads", &mmt::set_num_threads, "n"_a, "Threads for the kernels (<= 0: default).");
  m.def("num_threads", &mmt::num_threads);
  m.def("isa", &mmt::isa, "Code path chosen for this CPU: 'avx2+fma+avx512vnni', 'avx2+fma' or 'scalar'.");
  m.def("built_mlx_version", [] {
    return std::to_string(MLX_VERSION_MAJOR) + "." + std::to_string(MLX_VERSION_MINOR) + "." +
           std::to_string(MLX_VERSION_PATCH);
  });
}
