// A decode step of a Llama-family decoder in one native call (engine.h), for one sequence and one token.
//
// The Python loop of lowbit/decode/decoder.py spends most of a small model's token between the weight reads: a
// torch op per norm, rotation and residual, a kernel call per GEMV, each kernel its own OpenMP region (a fork and
// a join, 121 a token on SmolLM2). Here one thread team lives for the whole token. Each phase splits its work
// over the team and ends at a barrier:
//
//   every layer:  h = norm1(x)            each thread, for itself (a few microseconds: cheaper than a barrier)
//                 qkv = W_qkv h           rows split over threads          | barrier
//                 rotate q, k; cache k, v heads split                      | barrier
//                 attention               query heads split                | barrier
//                 x += W_o attn           rows split                       | barrier
//                 h = norm2(x)            each thread
//                 a = act(W_g h) * W_u h  intermediate rows split (a thread's gate and up rows are the same i)
//                                                                           | barrier
//                 x += W_d a              rows split                       | barrier
//   then:         logits = W_head norm(x) rows split
//
// The arithmetic is the Python step's, in float32: the same kernels for every product, the rotation in the same
// operations; norms, softmax and activations sum in another order (float rounding).
#include "engine.h"

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define LOWBIT_AVX512 1
#endif

namespace {
torch::Tensor checked_bias(const c10::optional<torch::Tensor>& bias, int64_t N) {
  if (!bias) return {};
  TORCH_CHECK(bias->numel() == N, "DecodeWeight: the bias has ", bias->numel(), " values for ", N, " rows");
  return bias->to(torch::kFloat32).contiguous();
}
}  // namespace

std::shared_ptr<DecodeWeight> DecodeWeight::lut(std::shared_ptr<LutPlan> plan, int64_t N, int64_t K,
                                                c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(plan, "DecodeWeight.lut: no plan");
  TORCH_CHECK(lut_shape(*plan) == std::make_pair(N, K), "DecodeWeight.lut: the plan's weight is not [", N, ", ", K,
              "]");
  auto d = std::make_shared<DecodeWeight>();
  d->kind = Kind::Lut, d->plan = plan, d->N = N, d->K = K, d->bias = checked_bias(bias, N);
  return d;
}

std::shared_ptr<DecodeWeight> DecodeWeight::dense(torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(w.dtype() == torch::kFloat32 && w.dim() == 2 && w.is_contiguous(), "DecodeWeight.dense: w must be "
              "contiguous float32 [N, K]");
  auto d = std::make_shared<DecodeWeight>();
  d->kind = Kind::Float, d->w = w, d->N = w.size(0), d->K = w.size(1), d->bias = checked_bias(bias, d->N);
  return d;
}

std::shared_ptr<DecodeWeight> DecodeWeight::int8(torch::Tensor codes, torch::Tensor row_scale,
                                                 c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(codes.dtype() == torch::kInt8 && codes.dim() == 2 && codes.is_contiguous(), "DecodeWeight.int8: "
              "codes must be contiguous int8 [N, K]");
  TORCH_CHECK(row_scale.dtype() == torch::kFloat32 && row_scale.numel() == codes.size(0), "DecodeWeight.int8: "
              "row_scale must be float32 [N]");
  auto d = std::make_shared<DecodeWeight>();
  d->kind = Kind::Int8, d->w = codes, d->scale = row_scale.contiguous(), d->N = codes.size(0), d->K = codes.size(1);
  d->bias = checked_bias(bias, d->N);
  return d;
}

std::shared_ptr<DecodeWeight> DecodeWeight::ternary(torch::Tensor packed, double gamma, int64_t N, int64_t K,
                                                    c10::optional<torch::Tensor> bias, bool input_norm) {
  TORCH_CHECK(K > 0 && K % 4 == 0, "DecodeWeight.ternary: rows must hold a multiple of 4 weights, not ", K);
  TORCH_CHECK(packed.dtype() == torch::kUInt8 && packed.is_contiguous() && packed.numel() == N * K / 4,
              "DecodeWeight.ternary: packed must be contiguous uint8 of ", N * K / 4, " bytes");
  TORCH_CHECK(std::isfinite(gamma), "DecodeWeight.ternary: gamma must be finite");
  auto d = std::make_shared<DecodeWeight>();
  d->kind = Kind::Ternary, d->w = packed, d->gamma = static_cast<float>(gamma), d->input_norm = input_norm;
  d->N = N, d->K = K, d->bias = checked_bias(bias, N);
  return d;
}

void DecodeWeight::rows(const float* x, LutRowInput& in, float* y, int64_t n0, int64_t n1) const {
  if (n0 >= n1) return;
  if (kind == Kind::Lut) {
    if (!lut_input_matches(*plan, in)) lut_prepare_row(*plan, x, in);
    lut_rows_range(*plan, in, x, y, n0, n1);
  } else if (kind == Kind::Float) {
    float_rows_range(x, w.data_ptr<float>(), y, K, n0, n1);
  } else if (kind == Kind::Int8) {
    int8_rows_range(x, w.data_ptr<int8_t>(), scale.data_ptr<float>(), y, K, n0, n1);
  } else {
    ternary_prepare_row(x, K, input_norm, in);
    ternary_rows_range(w.data_ptr<uint8_t>(), gamma, in, y, K, n0, n1);
  }
  if (bias.defined()) {
    const float* b = bias.data_ptr<float>();
    for (int64_t n = n0; n < n1; ++n) y[n] += b[n];
  }
}

namespace {

// [begin, end) of part t of T of [0, total)
inline std::pair<int64_t, int64_t> share(int64_t total, int t, int T) {
  return {total * t / T, total * (t + 1) / T};
}

// Rows [r0, r1) of a group of weights stacked in order (q, k, v): each weight's rows land at its offset in y.
void group_rows(const Weights& ws, const float* x, LutRowInput& in, float* y, int64_t r0, int64_t r1) {
  int64_t first = 0;
  for (const auto& w : ws) {
    const int64_t a = std::max(r0, first), b = std::min(r1, first + w->N);
    if (a < b) w->rows(x, in, y + first, a - first, b - first);
    first += w->N;
  }
}

inline float dot(const float* a, const float* b, int64_t n) {
#ifdef LOWBIT_AVX512
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
  }
  for (; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
    s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
#else
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
#endif
}

// y += a * x
inline void axpy(float a, const float* x, float* y, int64_t n) {
#ifdef LOWBIT_AVX512
  const __m512 av = _mm512_set1_ps(a);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
#else
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
#endif
}

// transformers' RMSNorm in float32: x * rsqrt(mean(x^2) + eps) * gain
void rms_norm(const float* x, const float* gain, float eps, float* out, int64_t n) {
  const float r = 1.f / std::sqrt(dot(x, x, n) / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = gain[i] * (x[i] * r);
}

// x * cos + roll(x, d / 2) * sin for one head of d values (sin holds rotate-half's sign), in place
void rotate(float* x, const float* cos, const float* sin, int64_t d, float* tmp) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < d; ++i) tmp[i] = x[i] * cos[i] + x[i < half ? i + half : i - half] * sin[i];
  std::memcpy(x, tmp, d * sizeof(float));
}

inline float silu(float g) { return g / (1.f + std::exp(-g)); }

inline float gelu_tanh(float g) {
  const float k = 0.7978845608028654f;  // sqrt(2 / pi)
  return 0.5f * g * (1.f + std::tanh(k * (g + 0.044715f * g * g * g)));
}

}  // namespace

DecodeEngine::DecodeEngine(int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate,
                           double eps, double scaling, std::string act, torch::Tensor cos, torch::Tensor sin,
                           torch::Tensor final_norm, std::shared_ptr<DecodeWeight> head, bool int8_x)
    : hidden_(hidden), heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim), intermediate_(intermediate),
      eps_(static_cast<float>(eps)), scaling_(static_cast<float>(scaling)), head_(std::move(head)) {
  TORCH_CHECK(act == "silu" || act == "gelu_tanh", "DecodeEngine: act must be silu or gelu_tanh, got ", act);
  TORCH_CHECK(heads % kv_heads == 0 && head_dim % 2 == 0, "DecodeEngine: heads must group over kv heads");
  TORCH_CHECK(cos.dtype() == torch::kFloat32 && cos.dim() == 2 && cos.size(1) == head_dim && sin.sizes() == cos.sizes(),
              "DecodeEngine: cos and sin must be float32 [max_len, head_dim]");
  TORCH_CHECK(!head_ || head_->K == hidden, "DecodeEngine: the head takes ", head_->K, " features, not ", hidden);
  gelu_ = act == "gelu_tanh";
  int8_x_ = int8_x;
  cos_ = cos.contiguous(), sin_ = sin.contiguous(), max_len_ = cos.size(0);
  final_norm_ = final_norm.to(torch::kFloat32).contiguous();
  TORCH_CHECK(final_norm_.numel() == hidden, "DecodeEngine: final_norm must have ", hidden, " values");
}

void DecodeEngine::add_layer(torch::Tensor norm1, torch::Tensor norm2, Weights qkv, std::shared_ptr<DecodeWeight> o,
                             Weights gate_up, std::shared_ptr<DecodeWeight> down, torch::Tensor k_cache,
                             torch::Tensor v_cache) {
  const int64_t q_rows = heads_ * head_dim_, kv_rows = kv_heads_ * head_dim_;
  int64_t rows = 0;
  for (const auto& w : qkv) {
    TORCH_CHECK(w->K == hidden_, "DecodeEngine: q/k/v take ", hidden_, " features");
    rows += w->N;
  }
  TORCH_CHECK(rows == q_rows + 2 * kv_rows, "DecodeEngine: q/k/v have ", rows, " rows, expected ", q_rows + 2 * kv_rows);
  rows = 0;
  for (const auto& w : gate_up) {
    TORCH_CHECK(w->K == hidden_, "DecodeEngine: gate/up take ", hidden_, " features");
    rows += w->N;
  }
  TORCH_CHECK(rows == 2 * intermediate_ && (gate_up.size() == 1 || gate_up[0]->N == intermediate_),
              "DecodeEngine: gate/up must be ", intermediate_, " rows each");
  TORCH_CHECK(o->K == q_rows && o->N == hidden_, "DecodeEngine: o must be [", hidden_, ", ", q_rows, "]");
  TORCH_CHECK(down->K == intermediate_ && down->N == hidden_, "DecodeEngine: down must be [", hidden_, ", ",
              intermediate_, "]");
  for (const auto& c : {k_cache, v_cache})
    TORCH_CHECK(c.dtype() == torch::kFloat32 && c.is_contiguous() && c.dim() == 3 && c.size(0) == kv_heads_ &&
                    c.size(1) == max_len_ && c.size(2) == head_dim_,
                "DecodeEngine: caches must be contiguous float32 [", kv_heads_, ", ", max_len_, ", ", head_dim_, "]");
  for (const auto& n : {norm1, norm2}) TORCH_CHECK(n.numel() == hidden_, "DecodeEngine: norms need ", hidden_, " gains");
  layers_.push_back({norm1.to(torch::kFloat32).contiguous(), norm2.to(torch::kFloat32).contiguous(), k_cache, v_cache,
                     std::move(qkv), std::move(gate_up), std::move(o), std::move(down)});
}

torch::Tensor DecodeEngine::step(torch::Tensor x_in, int64_t pos) {
  TORCH_CHECK(x_in.dtype() == torch::kFloat32 && x_in.numel() == hidden_, "DecodeEngine.step: x must be float32 [",
              hidden_, "]");
  TORCH_CHECK(pos >= 0 && pos < max_len_, "DecodeEngine.step: position ", pos, " is past the cache's ", max_len_);
  const int64_t H = hidden_, D = head_dim_, I = intermediate_, QR = heads_ * D, KR = kv_heads_ * D;
  const int64_t group = heads_ / kv_heads_, half = D / 2;
  torch::Tensor x_t = x_in.reshape({H}).clone();
  const int64_t out_n = head_ ? head_->N : H;
  torch::Tensor out = torch::empty({out_n}, torch::kFloat32);
  qkv_.resize(QR + 2 * KR), attn_.resize(QR), gu_.resize(2 * I), act_.resize(I);
  float* qkv = qkv_.data();
  float* attn = attn_.data();
  float* gu = gu_.data();
  float* act = act_.data();
  float* x = x_t.data_ptr<float>();
  const float* cos = cos_.data_ptr<float>() + pos * D;
  const float* sin = sin_.data_ptr<float>() + pos * D;
  const int T = std::max(1, at::get_num_threads());
  if (static_cast<int>(scratch_.size()) < T) scratch_.resize(T);
  const int64_t widest = std::max({H, QR, I});
#pragma omp parallel num_threads(T)
  {
    const int t = omp_get_thread_num(), n = omp_get_num_threads();
    ThreadScratch& sc = scratch_[t];
    sc.h.resize(widest), sc.scores.resize(pos + 1), sc.tmp.resize(D);
    sc.in.want_int8_x = int8_x_;
    float* h = sc.h.data();
    for (const Layer& L : layers_) {
      float* kc = L.k_cache.data_ptr<float>();
      float* vc = L.v_cache.data_ptr<float>();
      // q, k, v
      rms_norm(x, L.norm1.data_ptr<float>(), eps_, h, H);
      sc.in.bits = -1;  // a new input: prepared again for LUT plans
      auto [r0, r1] = share(QR + 2 * KR, t, n);
      group_rows(L.qkv, h, sc.in, qkv, r0, r1);
#pragma omp barrier
      // rotate each query head and key head; the keys and values go to the cache at pos
      auto [u0, u1] = share(heads_ + kv_heads_, t, n);
      for (int64_t u = u0; u < u1; ++u) {
        if (u < heads_) {
          rotate(qkv + u * D, cos, sin, D, sc.tmp.data());
        } else {
          const int64_t g = u - heads_;
          float* k = qkv + QR + g * D;
          rotate(k, cos, sin, D, sc.tmp.data());
          std::memcpy(kc + (g * max_len_ + pos) * D, k, D * sizeof(float));
          std::memcpy(vc + (g * max_len_ + pos) * D, qkv + QR + KR + g * D, D * sizeof(float));
        }
      }
#pragma omp barrier
      // attention of each query head over positions [0, pos]
      auto [q0, q1] = share(heads_, t, n);
      for (int64_t hd = q0; hd < q1; ++hd) {
        const int64_t g = hd / group;
        const float* q = qkv + hd * D;
        const float* keys = kc + g * max_len_ * D;
        const float* values = vc + g * max_len_ * D;
        float* s = sc.scores.data();
        float top = -INFINITY;
        for (int64_t p = 0; p <= pos; ++p) s[p] = dot(q, keys + p * D, D) * scaling_, top = std::max(top, s[p]);
        float total = 0.f;
        for (int64_t p = 0; p <= pos; ++p) s[p] = std::exp(s[p] - top), total += s[p];
        float* o = attn + hd * D;
        std::fill(o, o + D, 0.f);
        const float inv = 1.f / total;
        for (int64_t p = 0; p <= pos; ++p) axpy(s[p] * inv, values + p * D, o, D);
      }
#pragma omp barrier
      // x += o(attn): each thread adds the rows it computed
      auto [o0, o1] = share(H, t, n);
      sc.in.bits = -1;
      L.o->rows(attn, sc.in, h, o0, o1);  // h is free until norm2 below, after the barrier
      for (int64_t i = o0; i < o1; ++i) x[i] += h[i];
#pragma omp barrier
      // the MLP: a thread's gate and up rows are the same i, so it applies the activation to its own rows
      rms_norm(x, L.norm2.data_ptr<float>(), eps_, h, H);
      sc.in.bits = -1;
      auto [i0, i1] = share(I, t, n);
      group_rows(L.gate_up, h, sc.in, gu, i0, i1);
      group_rows(L.gate_up, h, sc.in, gu, I + i0, I + i1);
      for (int64_t i = i0; i < i1; ++i) act[i] = (gelu_ ? gelu_tanh(gu[i]) : silu(gu[i])) * gu[I + i];
#pragma omp barrier
      sc.in.bits = -1;
      L.down->rows(act, sc.in, h, o0, o1);
      for (int64_t i = o0; i < o1; ++i) x[i] += h[i];
#pragma omp barrier
    }
    rms_norm(x, final_norm_.data_ptr<float>(), eps_, h, H);
    if (head_) {
      sc.in.bits = -1;
      auto [v0, v1] = share(out_n, t, n);
      head_->rows(h, sc.in, out.data_ptr<float>(), v0, v1);
    } else if (t == 0) {
      std::memcpy(out.data_ptr<float>(), h, H * sizeof(float));
    }
  }
  return out;
}
