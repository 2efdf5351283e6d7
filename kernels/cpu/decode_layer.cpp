#include "decode_layer.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <string>

#include "affine_kernels.h"
#include "affine_primitive.h"
#include "gaussian_level.h"
#include "layer_math.h"
#include "operands.h"
#include "thread_pool.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"

namespace mmt {
namespace {

constexpr int kCacheInputs = 3;  // x, k_cache, v_cache come first

// The opt-in profile (set_layer_profile): nanoseconds per section over all fused layers since the last read.
std::atomic<bool> g_profile{false};
std::atomic<int64_t> g_profile_ns[3] = {0, 0, 0};  // products, attention, the rest (norms, RoPE, activation, adds)
std::atomic<int64_t> g_profile_calls{0};

// Adds the time since the last lap to a section when profiling is on.
struct Laps {
  bool on = g_profile.load(std::memory_order_relaxed);
  std::chrono::steady_clock::time_point t = on ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
  void lap(int section) {
    if (!on) return;
    const auto now = std::chrono::steady_clock::now();
    g_profile_ns[section].fetch_add(std::chrono::duration_cast<std::chrono::nanoseconds>(now - t).count(),
                                    std::memory_order_relaxed);
    t = now;
  }
};

int norm_count(const DecodeLayerConfig& c) { return 2 + (c.qk_norm ? 2 : 0) + (c.sandwich ? 2 : 0); }

constexpr int kAffineArrays = 21, kGaussArrays = 5;

int weight_count(const DecodeLayerConfig& c) {
  return kAffineArrays + kGaussArrays * int(std::count(c.gauss.begin(), c.gauss.end(), true));
}

// ys[i] += the Gaussian level of product i (where it has one), added as FGSLinear adds its levels: the same
// bits as the separate nodes (two summands: the order of the add does not matter).
void add_gaussian(const GaussianWeights* G, int first, int n, const float* x, float* const* ys) {
  thread_local std::vector<float> t;
  for (int i = first; i < first + n; ++i) {
    if (!G[i].amp) continue;
    t.resize(G[i].rows);
    gaussian_matvec(G[i], x, t.data());
    float* y = ys[i - first];
    for (int r = 0; r < G[i].rows; ++r) y[r] = t[r] + y[r];
  }
}

AffineWeights affine_of(const mx::array& wq, const mx::array& scales, const mx::array& biases, int bits, int group) {
  const int rows = wq.shape(0), cols = int(int64_t(wq.shape(1)) * 32 / bits);
  return AffineWeights{wq.data<uint32_t>(), scales.data<void>(), biases.data<void>(), rows, cols, bits, group,
                       scales.dtype() == mx::float16};
}

}  // namespace

void set_layer_profile(bool on) { g_profile.store(on); }

std::array<double, 4> take_layer_profile() {
  std::array<double, 4> out{};
  for (int i = 0; i < 3; ++i) out[i] = double(g_profile_ns[i].exchange(0)) * 1e-6;
  out[3] = double(g_profile_calls.exchange(0));
  return out;
}

std::vector<mx::array> decode_layer_op(const mx::array& x, const mx::array& k_cache, const mx::array& v_cache,
                                       const std::vector<mx::array>& norms, const std::vector<mx::array>& weights,
                                       const DecodeLayerConfig& cfg, mx::StreamOrDevice s) {
  const int hidden = x.ndim() ? x.shape(-1) : 0;
  if (x.size() != size_t(hidden) || hidden == 0) throw std::invalid_argument("decode_layer: x must hold one token");
  const int Hq = cfg.heads, Hkv = cfg.kv_heads, D = cfg.head_dim;
  if (Hq <= 0 || Hkv <= 0 || D <= 0 || D % 2 || Hq % Hkv)
    throw std::invalid_argument("decode_layer: heads must be a multiple of kv_heads, head_dim even");
  if (k_cache.ndim() != 4 || k_cache.shape() != v_cache.shape() || k_cache.shape(0) != 1 ||
      k_cache.shape(1) != Hkv || k_cache.shape(3) != D || k_cache.dtype() != mx::float32 ||
      v_cache.dtype() != mx::float32)
    throw std::invalid_argument("decode_layer: caches must be f32 (1, kv_heads, N, head_dim)");
  if (cfg.cached < 0 || cfg.cached > k_cache.shape(2) || (cfg.write_cache && cfg.cached >= k_cache.shape(2)))
    throw std::invalid_argument("decode_layer: the cache views hold fewer keys than `cached` (or no room)");
  if (int(norms.size()) != norm_count(cfg) || int(weights.size()) != weight_count(cfg))
    throw std::invalid_argument("decode_layer: wrong number of norm or weight arrays");
  const int inter = weights[12].shape(0);
  const int cols[7] = {hidden, hidden, hidden, Hq * D, hidden, hidden, inter};
  const int rows[7] = {Hq * D, Hkv * D, Hkv * D, hidden, inter, inter, hidden};
  for (int i = 0; i < 7; ++i) {
    check_affine("decode_layer", cols[i], weights[3 * i], weights[3 * i + 1], weights[3 * i + 2], cfg.groups[i],
                 cfg.bits[i]);
    if (weights[3 * i].shape(0) != rows[i]) throw std::invalid_argument("decode_layer: a product has the wrong rows");
  }
  for (int i = 0, at = kAffineArrays; i < 7; ++i) {
    if (!cfg.gauss[i]) continue;
    check_gaussian("decode_layer", cols[i], weights[at], weights[at + 1], weights[at + 2], weights[at + 3],
                   weights[at + 4]);
    if (weights[at].shape(0) != rows[i]) throw std::invalid_argument("decode_layer: a Gaussian level has the wrong rows");
    at += kGaussArrays;
  }
  for (size_t i = 0; i < norms.size(); ++i) {
    const bool head_norm = cfg.qk_norm && (i == 1 || i == 2);
    if (norms[i].ndim() != 1 || norms[i].shape(0) != (head_norm ? D : hidden))
      throw std::invalid_argument("decode_layer: a norm weight has the wrong size");
  }
  auto stream = mx::to_stream(s);
  std::vector<mx::array> in = {mx::astype(x, mx::float32, stream), k_cache, v_cache};
  for (const auto& n : norms) in.push_back(mx::astype(n, mx::float32, stream));
  for (const auto& w : weights) in.push_back(w);
  const mx::Shape kv_shape = {1, Hkv, 1, D};
  return mx::array::make_arrays({x.shape(), kv_shape, kv_shape}, {mx::float32, mx::float32, mx::float32},
                                std::make_shared<DecodeLayer>(stream, cfg), in);
}

void DecodeLayer::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& enc = mx::cpu::get_command_encoder(stream());
  // x, norms and weights as plain row-major buffers; the caches are read through their strides
  std::vector<mx::array> rest(inputs.begin() + kCacheInputs, inputs.end());
  rest.insert(rest.begin(), inputs[0]);
  rest = row_contiguous_inputs(rest, enc);
  // the cache views are read through their strides, their last axis contiguous (copied if not: rare)
  auto contiguous_last = [&](const mx::array& a) {
    return a.strides()[3] == 1 ? a : row_contiguous_inputs({a}, enc)[0];
  };
  const mx::array kc = contiguous_last(inputs[1]), vc = contiguous_last(inputs[2]);
  if (cfg_.write_cache) {
    for (const auto* a : {&inputs[1], &inputs[2]})
      if (!a->flags().row_contiguous || a->data_size() != a->size())
        throw std::runtime_error("MmtDecodeLayer: write_cache needs whole row-contiguous cache buffers");
  }
  for (auto& o : outputs) o.set_data(mx::allocator::malloc(o.nbytes()));
  for (const auto& a : rest) enc.set_input_array(a);
  enc.set_input_array(kc);
  enc.set_input_array(vc);
  for (auto& o : outputs) enc.set_output_array(o);
  std::vector<mx::array> ins;
  for (const auto& a : rest) ins.push_back(mx::array::unsafe_weak_copy(a));
  enc.dispatch([ins = std::move(ins), kc = mx::array::unsafe_weak_copy(kc), vc = mx::array::unsafe_weak_copy(vc),
                h_out = mx::array::unsafe_weak_copy(outputs[0]), k_out = mx::array::unsafe_weak_copy(outputs[1]),
                v_out = mx::array::unsafe_weak_copy(outputs[2]), cfg = cfg_]() mutable {
    Laps laps;
    constexpr int kProducts = 0, kAttention = 1, kRest = 2;
    const int Hq = cfg.heads, Hkv = cfg.kv_heads, D = cfg.head_dim, group = Hq / Hkv;
    const int d = ins[0].shape(-1);
    const int nn = norm_count(cfg);
    const float* x = ins[0].data<float>();
    int ni = 1;
    const float* w_in = ins[ni++].data<float>();
    const float* w_qn = cfg.qk_norm ? ins[ni++].data<float>() : nullptr;
    const float* w_kn = cfg.qk_norm ? ins[ni++].data<float>() : nullptr;
    const float* w_post_attn = cfg.sandwich ? ins[ni++].data<float>() : nullptr;
    const float* w_pre_mlp = ins[ni++].data<float>();
    const float* w_post_mlp = cfg.sandwich ? ins[ni++].data<float>() : nullptr;
    AffineWeights W[7] = {
        affine_of(ins[1 + nn], ins[2 + nn], ins[3 + nn], cfg.bits[0], cfg.groups[0]),
        affine_of(ins[4 + nn], ins[5 + nn], ins[6 + nn], cfg.bits[1], cfg.groups[1]),
        affine_of(ins[7 + nn], ins[8 + nn], ins[9 + nn], cfg.bits[2], cfg.groups[2]),
        affine_of(ins[10 + nn], ins[11 + nn], ins[12 + nn], cfg.bits[3], cfg.groups[3]),
        affine_of(ins[13 + nn], ins[14 + nn], ins[15 + nn], cfg.bits[4], cfg.groups[4]),
        affine_of(ins[16 + nn], ins[17 + nn], ins[18 + nn], cfg.bits[5], cfg.groups[5]),
        affine_of(ins[19 + nn], ins[20 + nn], ins[21 + nn], cfg.bits[6], cfg.groups[6])};
    const int inter = W[4].rows;
    GaussianWeights G[7] = {};
    for (int i = 0, at = 1 + nn + kAffineArrays; i < 7; ++i) {
      if (!cfg.gauss[i]) continue;
      G[i] = gaussian_of(ins[at], ins[at + 1], ins[at + 2], ins[at + 3], ins[at + 4], W[i].cols);
      at += kGaussArrays;
    }
    std::vector<float> xn(d), q(size_t(Hq) * D), k(size_t(Hkv) * D), v(size_t(Hkv) * D), att(size_t(Hq) * D),
        o(d), h(d), g(inter), u(inter), a(inter);

    // attention block
    rms_norm_rows(x, w_in, xn.data(), 1, d, cfg.eps);
    laps.lap(kRest);
    {
      float* ys[3] = {q.data(), k.data(), v.data()};
      affine_matvec_shared_many(3, W, xn.data(), ys);
      add_gaussian(G, 0, 3, xn.data(), ys);
    }
    laps.lap(kProducts);
    if (cfg.qk_norm) {
      rms_norm_rows(q.data(), w_qn, q.data(), Hq, D, cfg.eps);
      rms_norm_rows(k.data(), w_kn, k.data(), Hkv, D, cfg.eps);
    }
    RopeAngles ang(D, cfg.rope_base);
    ang.at(cfg.position, cfg.rope_scale);
    for (int i = 0; i < Hq; ++i) rope_row(q.data() + size_t(i) * D, 1, q.data() + size_t(i) * D, ang);
    for (int i = 0; i < Hkv; ++i) rope_row(k.data() + size_t(i) * D, 1, k.data() + size_t(i) * D, ang);

    laps.lap(kRest);
    // attention over the cached keys in the window and the token's own key
    const int lo = cfg.window > 0 ? std::max(0, cfg.cached + 1 - cfg.window) : 0, lk = cfg.cached + 1 - lo;
    const auto &ks = kc.strides(), &vs = vc.strides();
    parallel_for(Hq, num_threads(), [&](int i) {  // heads shared out: each is the same arithmetic on any thread
      thread_local std::vector<float> p, acc;
      p.resize(lk);
      acc.resize(D);
      const int hk = i / group;
      const float* kb = kc.data<float>() + hk * ks[1] + lo * ks[2];
      const float* vb = vc.data<float>() + hk * vs[1] + lo * vs[2];
      attend_row(q.data() + size_t(i) * D, kb, ks[2], vb, vs[2], lk, D, cfg.attn_scale, nullptr, 0, p.data(),
                 acc.data(), att.data() + size_t(i) * D, k.data() + size_t(hk) * D, v.data() + size_t(hk) * D);
    });
    std::memcpy(k_out.data<float>(), k.data(), k.size() * sizeof(float));
    std::memcpy(v_out.data<float>(), v.data(), v.size() * sizeof(float));
    if (cfg.write_cache) {  // row `cached` of each head of the (1, Hkv, cap, D) buffers
      const int cap = kc.shape(2);
      for (int i = 0; i < Hkv; ++i) {
        std::memcpy(kc.data<float>() + (size_t(i) * cap + cfg.cached) * D, k.data() + size_t(i) * D,
                    size_t(D) * sizeof(float));
        std::memcpy(vc.data<float>() + (size_t(i) * cap + cfg.cached) * D, v.data() + size_t(i) * D,
                    size_t(D) * sizeof(float));
      }
    }
    laps.lap(kAttention);
    affine_matvec_shared(W[3], att.data(), o.data());
    {
      float* ys[1] = {o.data()};
      add_gaussian(G, 3, 1, att.data(), ys);
    }
    laps.lap(kProducts);
    if (cfg.sandwich) rms_norm_rows(o.data(), w_post_attn, o.data(), 1, d, cfg.eps);
    for (int i = 0; i < d; ++i) h[i] = x[i] + o[i];

    // MLP block
    rms_norm_rows(h.data(), w_pre_mlp, xn.data(), 1, d, cfg.eps);
    laps.lap(kRest);
    {
      float* ys[2] = {g.data(), u.data()};
      affine_matvec_shared_many(2, W + 4, xn.data(), ys);
      add_gaussian(G, 4, 2, xn.data(), ys);
    }
    laps.lap(kProducts);
    gated_activation(g.data(), u.data(), a.data(), inter, cfg.gelu);
    laps.lap(kRest);
    affine_matvec_shared(W[6], a.data(), o.data());
    {
      float* ys[1] = {o.data()};
      add_gaussian(G, 6, 1, a.data(), ys);
    }
    laps.lap(kProducts);
    if (cfg.sandwich) rms_norm_rows(o.data(), w_post_mlp, o.data(), 1, d, cfg.eps);
    float* out = h_out.data<float>();
    for (int i = 0; i < d; ++i) out[i] = h[i] + o[i];
    laps.lap(kRest);
    if (laps.on) g_profile_calls.fetch_add(1, std::memory_order_relaxed);
  });
}

void DecodeLayer::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("MmtDecodeLayer runs on the CPU only; GPUs run the layer's separate ops");
}

bool DecodeLayer::is_equivalent(const mx::Primitive& other) const {
  return cfg_ == static_cast<const DecodeLayer&>(other).cfg_;
}

}  // namespace mmt
