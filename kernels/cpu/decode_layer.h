// One decoder layer for one decoded token as a single MLX primitive on the CPU: RMSNorm, the q/k/v products,
// (q/k norms), RoPE, the KV-cache write, attention, the output product, (sandwich norms), the gated MLP and both
// residual adds (the cache itself is written by the caller). Built from MLX ops a layer is ~25 graph nodes; MLX's CPU scheduler keeps only a few tasks in
// flight, so the thread queuing step t+1 ran most of them itself and graph building never overlapped
// computation. As one node per layer the next token's graph is built while this one runs, and the products
// use every core. Every step calls the same functions as the one-op primitives (layer_math.h,
// affine_matvec_shared), so a token computed here has the same bits as through the separate nodes.
#pragma once

#include <array>
#include <vector>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mmt {

namespace mx = mlx::core;

struct DecodeLayerConfig {
  int heads = 0, kv_heads = 0, head_dim = 0;
  float eps = 1e-5f, rope_base = 10000.f, rope_scale = 1.f, attn_scale = 1.f;
  bool gelu = false;      // the MLP's activation: GELU (tanh approximation) or SiLU
  bool qk_norm = false;   // RMSNorm of each q and k head (Gemma 3)
  bool sandwich = false;  // RMSNorm of the attention and MLP outputs before their residual adds (Gemma 3)
  int position = 0;       // the token's position (RoPE)
  int cached = 0;         // keys held by the cache views before this token (the first `cached` of axis 2)
  int window = 0;         // > 0: the query sees only the last `window` keys, its own included
  bool write_cache = false;  // also store the token's key and value at index `cached` of the cache buffers,
                             // in place (see decode_layer_op)
  std::array<int, 7> bits{}, groups{};  // q, k, v, o, gate, up, down
  std::array<bool, 7> gauss{};          // the product also has a Gaussian level (added to the affine one)

  bool operator==(const DecodeLayerConfig&) const = default;
};

// x (..., hidden) holding one token; k_cache, v_cache (1, kv_heads, N >= cached, head_dim) f32 views of the
// earlier keys and values; norms: the input norm, (q norm, k norm), (post-attention norm), the pre-MLP norm,
// (post-MLP norm); weights: (wq, scales, biases) of q, k, v, o, gate, up, down in MLX's affine layout, then
// (amp, index, perm, taps, reach) of each product with cfg.gauss set, in that order (gaussian_level.h).
// Returns {h, k, v}: the layer's output and the token's key and value (1, kv_heads, 1, head_dim).
// With write_cache the node also writes k and v into the cache buffers at index `cached`, in place: they must
// be whole row-contiguous buffers with room there. That breaks MLX's rule that arrays are values, safely only
// under the KV cache's own invariant: index `cached` lies past every view anyone took of the buffer (they end
// at the cache's offset), is written once, and the next readers (this cache's next steps) depend on this node
// through the token; any other reader of the buffer (a batch being formed, a prompt-cache copy) is built after
// the node was queued, and MLX's CPU stream runs its tasks in order. It saves the two slice-update nodes per layer a copy-free append would otherwise take
// (an output of a multi-output primitive cannot take an input's buffer over: MLX counts each output's
// reference), and fewer, larger nodes are the point of this primitive.
std::vector<mx::array> decode_layer_op(const mx::array& x, const mx::array& k_cache, const mx::array& v_cache,
                                       const std::vector<mx::array>& norms, const std::vector<mx::array>& weights,
                                       const DecodeLayerConfig& cfg, mx::StreamOrDevice s = {});

// An opt-in profile of the fused layers (bench/decode_profile.py): while on, each layer adds its time per
// section; take_layer_profile returns {products, attention, rest} in ms and the number of layers run since the
// last call, and resets them.
void set_layer_profile(bool on);
std::array<double, 4> take_layer_profile();

class DecodeLayer : public mx::Primitive {
 public:
  DecodeLayer(mx::Stream stream, DecodeLayerConfig cfg) : mx::Primitive(stream), cfg_(cfg) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return "MmtDecodeLayer"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  DecodeLayerConfig cfg_;
};

}  // namespace mmt
