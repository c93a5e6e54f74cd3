// A decode step of a Llama-family decoder (one token, one sequence) as one native call (engine.cpp).
#pragma once
#include <torch/types.h>

#include "lut_plan.h"
#include "rows.h"

#include <memory>
#include <string>
#include <vector>

// One weight the engine multiplies by a row of x: a LUT plan, float32 rows, int8 rows with a scale per row, or
// ternary rows packed 2 bits a weight with one scale (BitNet b1.58: x per-token int8, RMS-normed first if asked);
// and an optional float32 bias.
struct DecodeWeight {
  enum class Kind { Lut, Float, Int8, Ternary };
  static std::shared_ptr<DecodeWeight> lut(std::shared_ptr<LutPlan> plan, int64_t N, int64_t K,
                                           c10::optional<torch::Tensor> bias);
  static std::shared_ptr<DecodeWeight> dense(torch::Tensor w, c10::optional<torch::Tensor> bias);
  static std::shared_ptr<DecodeWeight> int8(torch::Tensor codes, torch::Tensor row_scale,
                                            c10::optional<torch::Tensor> bias);
  static std::shared_ptr<DecodeWeight> ternary(torch::Tensor packed, double gamma, int64_t N, int64_t K,
                                               c10::optional<torch::Tensor> bias, bool input_norm);
  // y[n] = x . W[n] (+ bias[n]) for n in [n0, n1); `in` holds x prepared for LUT plans (prepared here if not).
  void rows(const float* x, LutRowInput& in, float* y, int64_t n0, int64_t n1) const;

  Kind kind = Kind::Float;
  std::shared_ptr<LutPlan> plan;
  // float32 [N, K], int8 codes [N, K] and float32 [N], or packed ternary uint8 [N * K / 4]; bias float32 [N] or empty
  torch::Tensor w, scale, bias;
  float gamma = 1.f;        // ternary: the weight's one scale
  bool input_norm = false;  // ternary: RMS-norm x (no gain) before quantizing it
  int64_t N = 0, K = 0;
};
using Weights = std::vector<std::shared_ptr<DecodeWeight>>;

class DecodeEngine {
 public:
  // act: "silu" or "gelu_tanh"; cos and sin float32 [max_len, head_dim], sin with rotate-half's sign folded in
  // (x * cos + roll(x, head_dim / 2) * sin); head may be null (then step returns the final normed hidden state).
  // int8_x: LUT weights that take it multiply int8-quantized activations (rows.h); the others stay float32.
  DecodeEngine(int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate, double eps,
               double scaling, std::string act, torch::Tensor cos, torch::Tensor sin, torch::Tensor final_norm,
               std::shared_ptr<DecodeWeight> head, bool int8_x);
  // One decoder layer: RMSNorm gains (float32), q/k/v as one fused weight or three, o, gate/up as one fused
  // weight (gate rows first) or two, down; the layer's float32 KV cache [kv_heads, max_len, head_dim].
  void add_layer(torch::Tensor norm1, torch::Tensor norm2, Weights qkv, std::shared_ptr<DecodeWeight> o,
                 Weights gate_up, std::shared_ptr<DecodeWeight> down, torch::Tensor k_cache, torch::Tensor v_cache);
  // x: the token's embedding, float32 [hidden], at position pos (cache positions [0, pos) filled): logits [vocab]
  // (or the normed hidden state [hidden] without a head). Writes the token's keys and values into the caches.
  // One step at a time per engine (its scratch is reused).
  torch::Tensor step(torch::Tensor x, int64_t pos);

 private:
  struct Layer {
    torch::Tensor norm1, norm2, k_cache, v_cache;
    Weights qkv, gate_up;
    std::shared_ptr<DecodeWeight> o, down;
  };
  int64_t hidden_, heads_, kv_heads_, head_dim_, intermediate_, max_len_;
  float eps_, scaling_;
  bool gelu_, int8_x_;
  torch::Tensor cos_, sin_, final_norm_;
  std::shared_ptr<DecodeWeight> head_;
  std::vector<Layer> layers_;
  // Reused by every step (a step at a time): the shared activations, and each thread's normed input, LUT input
  // and attention scores.
  struct ThreadScratch {
    std::vector<float> h, scores, tmp;
    LutRowInput in;
  };
  std::vector<float> qkv_, attn_, gu_, act_;
  std::vector<ThreadScratch> scratch_;
};
