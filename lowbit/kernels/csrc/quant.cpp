// lowbit CPU quantization kernels. Each function mirrors a plain-torch reference in
// lowbit/kernels/reference.py and must produce bit-identical results; tests check that.
#include <torch/types.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "rows.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kChunk = 256;  // elements handled at once inside a block (stays in L1)

// Largest |x| of a block, or NaN when the block holds NaN or Inf (the caller raises).
inline float block_absmax(const float* p, int64_t len) {
  float lanes[16] = {0};
  float poison[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    for (int j = 0; j < 16; ++j) {
      float v = std::fabs(p[i + j]);
      lanes[j] = v > lanes[j] ? v : lanes[j];
      poison[j] += p[i + j] * 0.0f;  // NaN if any input is NaN or Inf
    }
  }
  float a = 0.f, bad = 0.f;
  for (; i < len; ++i) {
    float v = std::fabs(p[i]);
    a = v > a ? v : a;
    bad += p[i] * 0.0f;
  }
  for (int j = 0; j < 16; ++j) {
    a = lanes[j] > a ? lanes[j] : a;
    bad += poison[j];
  }
  return bad == 0.f ? a : std::numeric_limits<float>::quiet_NaN();
}

// min(row, 0) and max(row, 0) of finite p[0..len), in 16 lanes (as block_absmax) so that the compiler vectorizes it.
inline void block_minmax(const float* p, int64_t len, float& lo, float& hi) {
  float los[16] = {0}, his[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= len; i += 16)
    for (int j = 0; j < 16; ++j) {
      const float v = p[i + j];
      los[j] = v < los[j] ? v : los[j];
      his[j] = v > his[j] ? v : his[j];
    }
  lo = 0.f, hi = 0.f;
  for (; i < len; ++i) lo = p[i] < lo ? p[i] : lo, hi = p[i] > hi ? p[i] : hi;
  for (int j = 0; j < 16; ++j) lo = los[j] < lo ? los[j] : lo, hi = his[j] > hi ? his[j] : hi;
}

template <typename T>
inline T from_float(float v) { return static_cast<T>(v); }
template <>
inline c10::BFloat16 from_float<c10::BFloat16>(float v) { return c10::BFloat16(v); }
template <>
inline c10::Half from_float<c10::Half>(float v) { return c10::Half(v); }

// Round half to even for |v| < 2^22, as nearbyint in the default mode, but vectorizable.
inline float round_even(float v) {
  constexpr float magic = 12582912.0f;  // 1.5 * 2^23: the sum lies in [2^23, 2^24), where ulp = 1
  return (v + magic) - magic;
}

// Calls f with out's data pointer typed as float, BFloat16 or Half.
template <typename F>
void for_out_dtype(torch::Tensor out, F&& f) {
  if (out.dtype() == torch::kFloat32)
    f(out.data_ptr<float>());
  else if (out.dtype() == torch::kBFloat16)
    f(out.data_ptr<c10::BFloat16>());
  else if (out.dtype() == torch::kFloat16)
    f(out.data_ptr<c10::Half>());
  else
    TORCH_CHECK(false, "out must be float32, bfloat16 or float16");
}

// Order-preserving map of a float's bits to uint32 (negative floats reversed).
inline uint32_t ordered_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

}  // namespace

// 4-bit blockwise quantization (nf4 / fp4 / any 16-entry codebook), packed two codes a byte.
// scaled = clamp(x * (1 / max(absmax, 1e-38)), -1, 1); sorted index = #midpoints < scaled
// (ties to the lower code); code = order[sorted index].
std::vector<torch::Tensor> quantize_4bit(torch::Tensor x, int64_t blocksize, torch::Tensor midpoints,
                                         torch::Tensor order) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous(), "x must be contiguous float32");
  TORCH_CHECK(blocksize > 0 && blocksize % 2 == 0, "blocksize must be positive and even");
  const int64_t n = x.numel();
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  auto packed = torch::empty({(n + 1) / 2}, torch::kUInt8);
  auto absmax = torch::empty({nblocks}, torch::kFloat32);
  const float* px = x.data_ptr<float>();
  uint8_t* pq = packed.data_ptr<uint8_t>();
  float* pa = absmax.data_ptr<float>();
  float mid[15];
  uint8_t ord[16];
  std::memcpy(mid, midpoints.data_ptr<float>(), sizeof(mid));
  std::memcpy(ord, order.data_ptr<uint8_t>(), sizeof(ord));
  bool identity = true;
  for (int k = 0; k < 16; ++k) identity &= ord[k] == k;

  const int64_t grain = std::max<int64_t>(1, 16384 / blocksize);
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    uint8_t codes[kChunk];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * blocksize;
      const int64_t len = std::min(blocksize, n - start);
      const float a = block_absmax(px + start, len);
      pa[b] = a;
      const float inv = 1.0f / (a > 1e-38f ? a : 1e-38f);
      for (int64_t c = 0; c < len; c += kChunk) {
        const int64_t m = std::min(kChunk, len - c);
        const float* p = px + start + c;
        for (int64_t i = 0; i < m; ++i) {
          float s = p[i] * inv;
          s = s < -1.f ? -1.f : (s > 1.f ? 1.f : s);
          uint8_t q = 0;
          for (int k = 0; k < 15; ++k) q += mid[k] < s;
          codes[i] = q;
        }
        if (!identity)
          for (int64_t i = 0; i < m; ++i) codes[i] = ord[codes[i]];
        uint8_t* out = pq + (start + c) / 2;
        const int64_t pairs = m / 2;
        for (int64_t i = 0; i < pairs; ++i) out[i] = (codes[2 * i] << 4) | codes[2 * i + 1];
        if (m % 2) out[pairs] = codes[m - 1] << 4;  // odd tail of the whole tensor: pad with 0
      }
    }
  });
  return {packed, absmax};
}

// 4-bit dequantization: out[i] = code[nibble i] * absmax[i / blocksize], written as T.
template <typename T>
void dequantize_4bit_impl(const uint8_t* pq, const float* pa, const float* code, T* out, int64_t n,
                          int64_t blocksize) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  const int64_t grain = std::max<int64_t>(1, 16384 / blocksize);
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * blocksize;
      const int64_t len = std::min(blocksize, n - start);
      const float a = pa[b];
      float lut[16];
      for (int k = 0; k < 16; ++k) lut[k] = code[k] * a;
      const uint8_t* q = pq + start / 2;
      T* o = out + start;
      const int64_t pairs = len / 2;
      for (int64_t i = 0; i < pairs; ++i) {
        const uint8_t byte = q[i];
        o[2 * i] = from_float<T>(lut[byte >> 4]);
        o[2 * i + 1] = from_float<T>(lut[byte & 0xF]);
      }
      if (len % 2) o[len - 1] = from_float<T>(lut[q[pairs] >> 4]);
    }
  });
}

torch::Tensor dequantize_4bit(torch::Tensor packed, torch::Tensor absmax, torch::Tensor code, int64_t n,
                              int64_t blocksize, torch::Tensor out) {
  TORCH_CHECK(blocksize > 0 && blocksize % 2 == 0, "blocksize must be positive and even");
  TORCH_CHECK(out.is_contiguous() && out.numel() == n, "out must be contiguous with n elements");
  const uint8_t* pq = packed.data_ptr<uint8_t>();
  const float* pa = absmax.data_ptr<float>();
  const float* pc = code.data_ptr<float>();
  for_out_dtype(out, [&](auto* o) { dequantize_4bit_impl(pq, pa, pc, o, n, blocksize); });
  return out;
}

// Blockwise quantization with any sorted codebook of up to 256 entries, one code a byte.
// normed = x / absmax (0 for an all-zero block); code = the nearest entry by float32 distance,
// ties to the lower one.
torch::Tensor quantize_blockwise(torch::Tensor x, int64_t blocksize, torch::Tensor code, torch::Tensor absmax) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous(), "x must be contiguous float32");
  TORCH_CHECK(blocksize > 0, "blocksize must be positive");
  const int64_t n = x.numel();
  const int64_t nc = code.numel();
  TORCH_CHECK(nc >= 2 && nc <= 256, "codebook must have 2..256 entries");
  std::vector<float> c(code.data_ptr<float>(), code.data_ptr<float>() + nc);
  // Direct lookup: the ordered bits of [-1, 1] cut into cells of 2^16 ulps; each cell stores the
  // largest index whose entry lies at or below the cell's lowest value, so at most a couple of
  // forward steps remain per element.
  const uint32_t lo = ordered_bits(-1.0f), hi = ordered_bits(1.0f);
  const int shift = 16;
  const int64_t ncells = ((hi - lo) >> shift) + 1;
  std::vector<uint8_t> table(ncells);
  for (int64_t cell = 0, idx = 0; cell < ncells; ++cell) {
    const uint32_t key = lo + (static_cast<uint32_t>(cell) << shift);
    uint32_t u = (key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key;
    float v;
    std::memcpy(&v, &u, 4);
    while (idx + 1 < nc && c[idx + 1] <= v) ++idx;
    table[cell] = static_cast<uint8_t>(idx);
  }
  auto out = torch::empty({n}, torch::kUInt8);
  const float* px = x.data_ptr<float>();
  float* pa = absmax.data_ptr<float>();
  uint8_t* po = out.data_ptr<uint8_t>();
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  const int64_t grain = std::max<int64_t>(1, 16384 / blocksize);
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * blocksize;
      const int64_t len = std::min(blocksize, n - start);
      const float a = block_absmax(px + start, len);
      pa[b] = a;
      for (int64_t i = start; i < start + len; ++i) {
        const float v = a > 0.f ? px[i] / a : 0.f;
        int64_t idx = table[(ordered_bits(v) - lo) >> shift];
        while (idx + 1 < nc && c[idx + 1] <= v) ++idx;
        if (idx + 1 < nc && std::fabs(v - c[idx + 1]) < std::fabs(v - c[idx])) ++idx;
        po[i] = static_cast<uint8_t>(idx);
      }
    }
  });
  return out;
}

template <typename T>
void dequantize_blockwise_impl(const uint8_t* pq, const float* pa, const float* code, T* out, int64_t n,
                               int64_t blocksize) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  const int64_t grain = std::max<int64_t>(1, 16384 / blocksize);
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * blocksize;
      const int64_t end = std::min(start + blocksize, n);
      const float a = pa[b];
      for (int64_t i = start; i < end; ++i) out[i] = from_float<T>(code[pq[i]] * a);
    }
  });
}

torch::Tensor dequantize_blockwise(torch::Tensor q, torch::Tensor absmax, torch::Tensor code, int64_t blocksize,
                                   torch::Tensor out) {
  const int64_t n = q.numel();
  TORCH_CHECK(out.is_contiguous() && out.numel() == n, "out must be contiguous with as many elements as q");
  const uint8_t* pq = q.data_ptr<uint8_t>();
  const float* pa = absmax.data_ptr<float>();
  const float* pc = code.data_ptr<float>();
  for_out_dtype(out, [&](auto* o) { dequantize_blockwise_impl(pq, pa, pc, o, n, blocksize); });
  return out;
}

// f(r) for each row r of a [rows, cols] tensor, rows split across threads in grains of about 16k elements.
template <typename F>
inline void for_each_row(int64_t rows, int64_t cols, F f) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) f(r);
  });
}

// One row of quantize_rowwise_int8: codes into o; returns the row's absmax.
float quantize_row_int8(const float* p, int64_t cols, int8_t* o) {
  const float a = block_absmax(p, cols);
  if (!std::isfinite(a)) {  // the caller raises or returns NaN; no codes from NaN (a float -> int cast is undefined)
    std::memset(o, 0, cols);
    return a;
  }
  // 127 * (1 / a), not 127 / a: torch evaluates scalar / tensor this way, and so the reference.
  const float s = a > 0.f ? 127.0f * (1.0f / a) : 0.f;
  for (int64_t i = 0; i < cols; ++i) o[i] = static_cast<int8_t>(round_even(p[i] * s));
  return a;
}

// Vector-wise int8 absmax over the last dim: q = round_half_even(x * 127 * (1 / absmax)), 0 for a zero row.
std::vector<torch::Tensor> quantize_rowwise_int8(torch::Tensor x) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x must be 2-D contiguous float32");
  const int64_t rows = x.size(0), cols = x.size(1);
  auto q = torch::empty({rows, cols}, torch::kInt8);
  auto absmax = torch::empty({rows}, torch::kFloat32);
  const float* px = x.data_ptr<float>();
  int8_t* pq = q.data_ptr<int8_t>();
  float* pa = absmax.data_ptr<float>();
  for_each_row(rows, cols, [&](int64_t r) { pa[r] = quantize_row_int8(px + r * cols, cols, pq + r * cols); });
  return {q, absmax};
}

// One row of quantize_rowwise_zeropoint: codes into o, and the row's scale, shift (128 - zero) and absmax.
void zeropoint_row(const float* p, int64_t cols, int8_t* o, float& scale, int32_t& shift, float& absmax) {
  const float a = block_absmax(p, cols);
  absmax = a;
  if (!std::isfinite(a)) {  // the caller raises; no codes from NaN (a float -> int cast of NaN is undefined)
    std::memset(o, 0, cols), scale = 1.f, shift = 0;
    return;
  }
  float lo, hi;
  block_minmax(p, cols, lo, hi);
  float s = (hi - lo) / 255.0f;
  s = s > 0.f ? s : 1.0f;
  const float zero = std::min(std::max(round_even(-lo / s), 0.f), 255.f);
  scale = s;
  shift = 128 - static_cast<int32_t>(zero);
  const float inv = 1.0f / s;  // a multiply per element, not a divide; the reference does the same
  for (int64_t i = 0; i < cols; ++i) {
    const float u = std::min(std::max(round_even(p[i] * inv) + zero, 0.f), 255.f);
    o[i] = static_cast<int8_t>(static_cast<int32_t>(u) - 128);
  }
}

// Zero-point uint8 of each row of x, stored as the int8 u - 128, as lowbit.kernels.reference.quantize_rowwise_zeropoint
// does it: lo = min(row, 0), hi = max(row, 0), scale = (hi - lo) / 255 (1 where 0), zero = round(-lo / scale), u =
// clamp(round(x * (1 / scale)) + zero, 0, 255), rounding half to even. Returns {codes, scale, 128 - zero (int32), absmax
// (NaN where a row holds NaN or Inf)}.
std::vector<torch::Tensor> quantize_rowwise_zeropoint(torch::Tensor x) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x must be 2-D contiguous float32");
  const int64_t rows = x.size(0), cols = x.size(1);
  auto q = torch::empty({rows, cols}, torch::kInt8);
  auto scale = torch::empty({rows}, torch::kFloat32), absmax = torch::empty({rows}, torch::kFloat32);
  auto shift = torch::empty({rows}, torch::kInt32);
  const float* px = x.data_ptr<float>();
  int8_t* pq = q.data_ptr<int8_t>();
  float *ps = scale.data_ptr<float>(), *pa = absmax.data_ptr<float>();
  int32_t* pz = shift.data_ptr<int32_t>();
  for_each_row(rows, cols, [&](int64_t r) { zeropoint_row(px + r * cols, cols, pq + r * cols, ps[r], pz[r], pa[r]); });
  return {q, scale, shift, absmax};
}

// Ternary (BitNet b1.58) quantization and 2-bit packing: t = clamp(round_half_even(x / d), -1, 1),
// stored as t + 1, four a byte, the first in the high bits.
torch::Tensor quantize_ternary_2bit(torch::Tensor x, double divisor) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous(), "x must be contiguous float32");
  const int64_t n = x.numel();
  auto packed = torch::empty({(n + 3) / 4}, torch::kUInt8);
  const float* px = x.data_ptr<float>();
  uint8_t* pq = packed.data_ptr<uint8_t>();
  const float d = static_cast<float>(divisor);
  const int64_t nbytes = packed.numel();
  at::parallel_for(0, nbytes, 4096, [&](int64_t i0, int64_t i1) {
    uint8_t t[4 * kChunk];
    for (int64_t c0 = i0; c0 < i1; c0 += kChunk) {
      const int64_t bytes = std::min(kChunk, i1 - c0);
      const int64_t e0 = 4 * c0, m = std::min(4 * bytes, n - e0);
      for (int64_t k = 0; k < m; ++k) {
        float v = px[e0 + k] / d;
        v = v < -2.f ? -2.f : (v > 2.f ? 2.f : v);  // keeps round_even in range; the clamp below decides
        v = round_even(v);
        v = v < -1.f ? -1.f : (v > 1.f ? 1.f : v);
        t[k] = static_cast<uint8_t>(static_cast<int>(v) + 1);
      }
      for (int64_t k = m; k < 4 * bytes; ++k) t[k] = 0;  // pad the tensor's tail with code 0
      for (int64_t b = 0; b < bytes; ++b)
        pq[c0 + b] = (t[4 * b] << 6) | (t[4 * b + 1] << 4) | (t[4 * b + 2] << 2) | t[4 * b + 3];
    }
  });
  return packed;
}
