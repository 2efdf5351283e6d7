// Python bindings of the native CPU kernels (module mmt_mlx._native); mmt_mlx/native.py is the only user.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/array.h>
#include <nanobind/stl/vector.h>

#include <stdexcept>

#include "affine_gemm.h"
#include "affine_kernels.h"
#include "affine_primitive.h"
#include "attention.h"
#include "decode_layer.h"
#include "gaussian_level.h"
#include "hugepages.h"
#include "norm_rope.h"
#include "rotation.h"
#include "sampling.h"
#include "trellis.h"
#include "mlx/version.h"

namespace nb = nanobind;
namespace mx = mlx::core;
using namespace nb::literals;

NB_MODULE(_native, m) {
  m.doc() = "mmt_mlx native CPU kernels (MLX primitives)";
  m.def("affine_matmul", &mmt::affine_matmul_op, "x"_a, "wq"_a, "scales"_a, "biases"_a, "group_size"_a,
        "bits"_a, nb::kw_only(), "stream"_a = nb::none(),
        "y = x @ W.T for W in MLX's affine layout (f32 result), computed by the native CPU kernel.");
  m.def("codebook_matmul", &mmt::codebook_matmul_op, "x"_a, "wq"_a, "scales"_a, "codebook"_a, "group_size"_a,
        "bits"_a, nb::kw_only(), "stream"_a = nb::none(),
        "y = x @ W.T for codebook codes, W = scale * codebook[code] (f32 result), by the integer kernels.");
  m.def("codebook_matmul_available", [] { return mmt::int_gemm_available(4); },
        "Whether codebook_matmul runs here (the integer kernels: AVX2, MMT_NATIVE_FLOAT unset).");
  m.def("affine_dequantize", &mmt::affine_dequantize_op, "wq"_a, "scales"_a, "biases"_a, "group_size"_a,
        "bits"_a, nb::kw_only(), "stream"_a = nb::none(),
        "W (rows, cols) as f32 from MLX's affine layout, by the native CPU kernel (a long prompt's GEMM tile).");
  m.def("fft_rotate", &mmt::fft_rotate_op, "x"_a, "signs"_a, "phase"_a, "inverse"_a = false, nb::kw_only(),
        "stream"_a = nb::none(),
        "The seeded FFT rotation irfft(rfft(signs x) phase) of each row of x, or its inverse (f32).");
  m.def("argmax_last", &mmt::argmax_last_op, "x"_a, nb::kw_only(), "stream"_a = nb::none(),
        "argmax over the last axis (uint32) in one CPU primitive, mx.argmax's index (the first NaN, else the first max).");
  m.def("rms_norm", &mmt::rms_norm_op, "x"_a, "w"_a, "eps"_a, nb::kw_only(), "stream"_a = nb::none(),
        "x * rsqrt(mean(x^2, -1) + eps) * w in one CPU primitive (f32).");
  m.def("rope", &mmt::rope_op, "x"_a, "offset"_a, "dims"_a, "base"_a, "scale"_a, nb::kw_only(),
        "stream"_a = nb::none(), "Half-split RoPE of x (B, H, T, D) at offset[b] + t in one CPU primitive (f32).");
  m.def("decode_attention", &mmt::decode_attention_op, "q"_a, "k"_a, "v"_a, "scale"_a, "mask"_a = nb::none(),
        nb::kw_only(), "stream"_a = nb::none(),
        "softmax(scale q k^T) v for (B, H, L, D) views, grouped KV heads, bool mask; (B, Lq, Hq * D) f32.");
  m.def("gaussian_matmul", &mmt::gaussian_matmul_op, "x"_a, "amp"_a, "index"_a, "perm"_a, "taps"_a, "reach"_a,
        nb::kw_only(), "stream"_a = nb::none(),
        "y = x @ W.T for a Gaussian level (f32): the input blurred at each width, K taps of the blurs per row.");
  m.def("gated_activation", &mmt::gated_activation_op, "gate"_a, "up"_a, "gelu"_a, nb::kw_only(),
        "stream"_a = nb::none(), "act(gate) * up (SiLU, or GELU's tanh approximation) in one CPU primitive (f32).");
  m.def(
      "decode_layer",
      [](const mx::array& x, const mx::array& k_cache, const mx::array& v_cache, const std::vector<mx::array>& norms,
         const std::vector<mx::array>& weights, const std::vector<int>& bits, const std::vector<int>& groups,
         int heads, int kv_heads, int head_dim, float eps, float rope_base, float rope_scale, float attn_scale,
         bool gelu, bool qk_norm, bool sandwich, int position, int cached, int window, bool write_cache,
         const std::vector<bool>& gauss, mx::StreamOrDevice s) {
        if (bits.size() != 7 || groups.size() != 7 || (!gauss.empty() && gauss.size() != 7))
          throw std::invalid_argument("decode_layer: bits, groups (and gauss) need one entry per product (7)");
        mmt::DecodeLayerConfig cfg{heads, kv_heads, head_dim, eps, rope_base, rope_scale, attn_scale, gelu,
                                   qk_norm, sandwich, position, cached, window, write_cache};
        std::copy(bits.begin(), bits.end(), cfg.bits.begin());
        std::copy(groups.begin(), groups.end(), cfg.groups.begin());
        std::copy(gauss.begin(), gauss.end(), cfg.gauss.begin());
        return mmt::decode_layer_op(x, k_cache, v_cache, norms, weights, cfg, s);
      },
      "x"_a, "k_cache"_a, "v_cache"_a, "norms"_a, "weights"_a, "bits"_a, "groups"_a, nb::kw_only(), "heads"_a,
      "kv_heads"_a, "head_dim"_a, "eps"_a, "rope_base"_a, "rope_scale"_a, "attn_scale"_a, "gelu"_a, "qk_norm"_a,
      "sandwich"_a, "position"_a, "cached"_a, "window"_a, "write_cache"_a = false,
      "gauss"_a = std::vector<bool>{}, "stream"_a = nb::none(),
      "One decoder layer for one token in one CPU primitive: returns [h, k, v] (the token's key and value).");
  m.def(
      "tcq_quantize",
      [](nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu> t,
         nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu> w,
         nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu> lut, int bits, int state0,
         nb::ndarray<uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> out) {
        const int64_t n = static_cast<int64_t>(t.shape(0));
        if (bits < 1 || bits > 8 || static_cast<int64_t>(lut.shape(0)) != (int64_t{4} << bits) ||
            static_cast<int64_t>(w.shape(0)) != n || static_cast<int64_t>(out.shape(0)) != n)
          throw std::invalid_argument("tcq_quantize: t, w and out need one length, lut 4 << bits entries");
        nb::gil_scoped_release release;
        mmt::tcq_quantize(t.data(), w.data(), n, lut.data(), bits, state0, out.data());
      },
      "t"_a, "w"_a, "lut"_a, "bits"_a, "state0"_a, "out"_a,
      "Trellis-coded quantization of one sequence (Viterbi, kernels/cpu/trellis.h) into out (uint8).");
  m.def("set_layer_profile", &mmt::set_layer_profile, "on"_a, "Time the fused layers' sections (off by default).");
  m.def("take_layer_profile", &mmt::take_layer_profile,
        "[products, attention, rest] ms and the layer count since the last call; resets them.");
  m.def("gemm_min_tokens", [] { return mmt::kGemmMinTokens; },
        "Token count from which affine_matmul decodes W into the f32 GEMM instead of the integer kernels.");
  m.def("advise_hugepages", &mmt::advise_hugepages, "arrays"_a,
        "Back the arrays' buffers with 2 MB pages (Linux); returns the bytes collapsed now.");
  m.def("set_num_threads", &mmt::set_num_threads, "n"_a, "Threads for the kernels (<= 0: default).");
  m.def("num_threads", &mmt::num_threads);
  m.def("isa", &mmt::isa, "Code path chosen for this CPU: 'avx2+fma+avx512vnni', 'avx2+fma' or 'scalar'.");
  m.def("built_mlx_version", [] {
    return std::to_string(MLX_VERSION_MAJOR) + "." + std::to_string(MLX_VERSION_MINOR) + "." +
           std::to_string(MLX_VERSION_PATCH);
  });
}
