// lowbit CPU matmul kernels for low-bit weights. Plain-torch definitions: lowbit/kernels/reference.py.
//
// LUT weights (NF4/FP4 with absmax, double-quantized absmax, uniform int4/int2 with scale and zero):
// a row of W is `bits`-bit codes (4 or 2, the first in the high bits of a byte; 3: eight codes in a big-endian
// 24-bit word), value = lut[code] * scale[block] - scale[block] * zero[block]. The AVX-512 path reads 64 bytes
// of codes as 16 int32 lanes (3-bit: 48 bytes, each 24-bit word spread to a lane) and takes code s of every lane
// with one shift: vpermps looks at the low 4 bits of each lane only, so no mask is needed (2- and 3-bit codes
// use a lut repeated four or two times). The codes of one shift are 16 non-adjacent weights; x is permuted once
// per call into that "lane order" instead.
//
// SpQR adds two things: the scales and zeros are 3-bit codes with fp16 second-level statistics over blocks of
// `stat_group` rows, decoded per row; and a few weights are outliers (CSR, fp16) that replace the coded weight.
#include <torch/types.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include "lut_plan.h"
#include "rows.h"

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define LOWBIT_AVX512 1
#endif

namespace {

// One core keeps only about ten cache misses in flight, and the out-of-order window of these compute-heavy loops
// reaches a few lines ahead: asking for the line 2 KB ahead lets a thread read at its full bandwidth (measured on
// a 25 MB NF4 weight: 3.4 ms without, 2.4 ms with, one thread). Prefetching past the end of an array is harmless.
constexpr int64_t kPrefetchBytes = 2048;
inline void prefetch_ahead(const void* p) {
  _mm_prefetch(static_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0);
}

// Calls f(m0, std::integral_constant<int, MB>) for the rows of x in blocks of up to 4: the kernels keep MB
// accumulators in registers, so MB must be a compile-time constant.
template <typename F>
void for_x_blocks(int64_t M, F&& f) {
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    switch (std::min<int64_t>(4, M - m0)) {
      case 1: f(m0, std::integral_constant<int, 1>()); break;
      case 2: f(m0, std::integral_constant<int, 2>()); break;
      case 3: f(m0, std::integral_constant<int, 3>()); break;
      default: f(m0, std::integral_constant<int, 4>()); break;
    }
  }
}

#ifdef LOWBIT_AVX512
// The GEMVs sum into several independent chains of FMAs: an FMA waits 4 cycles for its accumulator, and with two
// chains a one-row GEMV ran at half the FMA rate, latency-bound (CPU C, 1 thread: NF4 at K = 576 took 37 ns a row,
// the same as at K = 1024). Each of MB rows of x has its own chains, so fewer are needed per row as MB grows.
template <int MB>
constexpr int fma_chains() { return MB <= 2 ? 4 : 2; }

template <int CH, int MB>
inline __m512 add_chains(const __m512 (&sum)[CH][MB], int m) {
  __m512 t = sum[0][m];
  for (int h = 1; h < CH; ++h) t = _mm512_add_ps(t, sum[h][m]);
  return t;
}

#endif

#ifdef LOWBIT_AVX512
// t[idx] for 16 indices in 0..255 of a 256-float table: eight two-register permutes (each looks up 32 entries by
// the low 5 bits), then a tree of blends on bits 5, 6 and 7. A gather of the same (vgatherdps) took 57% of the
// double-quantized row constants' samples on CPU C.
inline __m512 lookup256(const float* t, __m512i idx) {
  __m512 r[8];
  for (int j = 0; j < 8; ++j)
    r[j] = _mm512_permutex2var_ps(_mm512_loadu_ps(t + 32 * j), idx, _mm512_loadu_ps(t + 32 * j + 16));
  const __mmask16 b5 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(32));
  const __mmask16 b6 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(64));
  const __mmask16 b7 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(128));
  for (int j = 0; j < 8; j += 2) r[j] = _mm512_mask_blend_ps(b5, r[j], r[j + 1]);
  r[0] = _mm512_mask_blend_ps(b6, r[0], r[2]);
  r[4] = _mm512_mask_blend_ps(b6, r[4], r[6]);
  return _mm512_mask_blend_ps(b7, r[0], r[4]);
}
#endif

// Everything a kernel needs to know about a LUT-quantized [N, K] weight.
struct LutFormat {
  const uint8_t* packed;
  int64_t N, K, bits, row_bytes, block, groups;
  float lut[16];
  // scale: float32 [N, groups], float16 [N, groups], or uint8 codes of double quantization (then
  // nested_absmax [ceil(N*groups/nested_block)], nested_table [256], offset).
  torch::Tensor scale, zero, nested_absmax, nested_table;
  const void* scale_p = nullptr;
  const void* zero_p = nullptr;
  const float* nested_absmax_p = nullptr;
  const float* nested_table_p = nullptr;
  double offset;
  int64_t nested_block;
  // SpQR statistics: scale holds the packed 3-bit codes of the scales and zeros [2, N, groups], decoded as
  // code * stat_scale + stat_zero (float16 [2, ceil(N / stat_group), groups]); stat_group == 0 without them.
  torch::Tensor stat_scale, stat_zero;
  const c10::Half* stat_scale_p = nullptr;
  const c10::Half* stat_zero_p = nullptr;
  int64_t stat_group = 0;
  // Outliers (CSR): weight (n, cols[j]) is values[j] for j in [rowptr[n], rowptr[n + 1]).
  torch::Tensor rowptr, cols, values;
  const int32_t* rowptr_p = nullptr;
  const int16_t* cols16_p = nullptr;  // one of the two, as stored
  const int32_t* cols32_p = nullptr;
  const c10::Half* values_p = nullptr;

  int64_t lane_elems() const { return bits == 3 ? 8 : 32 / bits; }  // weights in one int32 lane
  int64_t chunk() const { return 16 * lane_elems(); }                // weights in one load of codes
  int64_t padded_k() const { return (K + chunk() - 1) / chunk() * chunk(); }
  bool zero_term = false;  // set by make_format: zero points (or SpQR statistics) add -scale * zero
  bool has_zero() const { return zero_term; }
  int64_t scale_bytes = 0, zero_bytes = 0;  // bytes of one row's scales and zeros (0: not prefetched)

  // The scales and zeros (SpQR: their codes and the outliers) of row n + 8, asked for ahead as the codes are: they
  // are streams of their own, and without this the first load of each row's scales waited on memory (61% of the
  // row constants' samples in a SmolLM2 decode on CPU C, where the rows are short).
  void prefetch_constants(int64_t n) const {
    const int64_t ahead = n + 8;
    if (ahead >= N) return;
    if (scale_bytes) {
      const char* p = static_cast<const char*>(scale_p) + ahead * scale_bytes;
      _mm_prefetch(p, _MM_HINT_T0);
      _mm_prefetch(p + scale_bytes - 1, _MM_HINT_T0);
    }
    if (zero_bytes) {
      const char* p = static_cast<const char*>(zero_p) + ahead * zero_bytes;
      _mm_prefetch(p, _MM_HINT_T0);
      _mm_prefetch(p + zero_bytes - 1, _MM_HINT_T0);
    }
    if (stat_group) {  // SpQR: the row's 3-bit scale and zero codes, and its outliers
      const char* codes = static_cast<const char*>(scale_p);
      for (const int64_t i : {ahead * groups, (N + ahead) * groups}) {
        _mm_prefetch(codes + 3 * i / 8, _MM_HINT_T0);
        _mm_prefetch(codes + 3 * (i + groups) / 8, _MM_HINT_T0);
      }
    }
    if (rowptr_p) {
      const int32_t j = rowptr_p[ahead];
      _mm_prefetch(reinterpret_cast<const char*>(values_p + j), _MM_HINT_T0);
      _mm_prefetch(cols16_p ? reinterpret_cast<const char*>(cols16_p + j) : reinterpret_cast<const char*>(cols32_p + j),
                   _MM_HINT_T0);
    }
  }

  // The float scale and -scale*zero of each block of row n (buffers hold groups + 32 floats).
  void row_constants(int64_t n, float* s, float* nz) const {
    const int64_t g0 = n * groups;
    if (stat_group) {
      spqr_row_constants(n, s, nz);
      return;
    }
#ifdef LOWBIT_AVX512
    if (row_constants_avx512(g0, s, nz)) return;
#endif
    if (scale.scalar_type() == torch::kFloat32) {
      std::memcpy(s, static_cast<const float*>(scale_p) + g0, groups * sizeof(float));
    } else if (scale.scalar_type() == torch::kFloat16) {
      const c10::Half* p = static_cast<const c10::Half*>(scale_p) + g0;
      for (int64_t g = 0; g < groups; ++g) s[g] = static_cast<float>(p[g]);
    } else {  // double quantization: table[code] * nested_absmax[block / nested_block] + offset
      const uint8_t* c = static_cast<const uint8_t*>(scale_p) + g0;
      const float* t = nested_table_p;
      const float* na = nested_absmax_p;
      const float off = static_cast<float>(offset);
      for (int64_t g = 0; g < groups; ++g) s[g] = t[c[g]] * na[(g0 + g) / nested_block] + off;
    }
    for (int64_t g = groups; g < groups + 16; ++g) s[g] = 0.f;
    if (!has_zero()) return;
    if (zero.scalar_type() == torch::kFloat32) {
      const float* z = static_cast<const float*>(zero_p) + g0;
      for (int64_t g = 0; g < groups; ++g) nz[g] = -s[g] * z[g];
    } else {
      const uint8_t* z = static_cast<const uint8_t*>(zero_p) + g0;
      for (int64_t g = 0; g < groups; ++g) nz[g] = -s[g] * static_cast<float>(z[g]);
    }
    for (int64_t g = groups; g < groups + 16; ++g) nz[g] = 0.f;
  }

#ifdef LOWBIT_AVX512
  // The same, 16 blocks at a time; false where it does not apply (nested blocks not a power of two).
  bool row_constants_avx512(int64_t g0, float* s, float* nz) const {
    const bool dq = scale.scalar_type() == torch::kUInt8;
    int nested_shift = 0;
    if (dq) {
      while ((int64_t{1} << nested_shift) < nested_block) ++nested_shift;
      if ((int64_t{1} << nested_shift) != nested_block) return false;
    }
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t g = 0; g < groups + 16; g += 16) {
      const int64_t left = groups - g;
      const __mmask16 mk = left >= 16 ? (__mmask16)0xFFFF : left > 0 ? (__mmask16)((1u << left) - 1) : (__mmask16)0;
      __m512 sv;
      if (scale.scalar_type() == torch::kFloat32) {
        sv = _mm512_maskz_loadu_ps(mk, static_cast<const float*>(scale_p) + g0 + g);
      } else if (scale.scalar_type() == torch::kFloat16) {
        sv = _mm512_maskz_mov_ps(mk, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, static_cast<const c10::Half*>(scale_p) + g0 + g)));
      } else {
        const __m512i codes = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, static_cast<const uint8_t*>(scale_p) + g0 + g));
        const __m512 t = lookup256(nested_table_p, codes);
        const int64_t first = (g0 + g) >> nested_shift, last = (g0 + g + 15) >> nested_shift;
        const __m512i nidx = _mm512_srli_epi32(_mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(g0 + g)), iota), nested_shift);
        const __m512 na = first == last || left <= 0  // 16 blocks almost always share their nested absmax
                              ? _mm512_set1_ps(nested_absmax_p[first * (left > 0)])
                              : _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mk, nidx, nested_absmax_p, 4);
        sv = _mm512_maskz_mov_ps(mk, _mm512_fmadd_ps(t, na, _mm512_set1_ps(static_cast<float>(offset))));
      }
      _mm512_storeu_ps(s + g, sv);
      if (!has_zero()) continue;
      __m512 zv;
      if (zero.scalar_type() == torch::kFloat32)
        zv = _mm512_maskz_loadu_ps(mk, static_cast<const float*>(zero_p) + g0 + g);
      else
        zv = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, static_cast<const uint8_t*>(zero_p) + g0 + g)));
      _mm512_storeu_ps(nz + g, _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(sv, zv)));
    }
    return true;
  }
#endif

  // SpQR: scale = max(code * S + Z, 1e-8) and zero = code * S + Z, S and Z of row n's block of rows. The codes
  // are unpacked into s and nz first, then turned into the constants in place.
  void spqr_row_constants(int64_t n, float* s, float* nz) const {
    const uint8_t* codes = static_cast<const uint8_t*>(scale_p);
    const int64_t b0 = n / stat_group * groups, b1 = ((N + stat_group - 1) / stat_group + n / stat_group) * groups;
    int64_t g = 0;
#ifdef LOWBIT_AVX512
    // Rows whose codes start on a 24-bit word are unpacked 16 at a time in registers; others through s and nz.
    const bool aligned = groups % 8 == 0;
    if (!aligned) unpack3(codes, n * groups, groups, s), unpack3(codes, (N + n) * groups, groups, nz);
    for (; g < groups; g += 16) {
      const __mmask16 mk = groups - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (groups - g)) - 1);
      auto half16 = [&](const c10::Half* p) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, p + g)); };
      const __m512 cs = aligned ? codes3_x16(codes, n * groups + g) : _mm512_maskz_loadu_ps(mk, s + g);
      const __m512 cz = aligned ? codes3_x16(codes, (N + n) * groups + g) : _mm512_maskz_loadu_ps(mk, nz + g);
      // multiply, then add: the same two roundings as the reference
      const __m512 sc = _mm512_add_ps(_mm512_mul_ps(cs, half16(stat_scale_p + b0)), half16(stat_zero_p + b0));
      const __m512 z = _mm512_add_ps(_mm512_mul_ps(cz, half16(stat_scale_p + b1)), half16(stat_zero_p + b1));
      const __m512 sp = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(sc, _mm512_setzero_ps(), _CMP_GT_OQ),
                                             _mm512_set1_ps(1e-8f), sc);
      _mm512_mask_storeu_ps(s + g, mk, sp);
      _mm512_mask_storeu_ps(nz + g, mk, _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(sp, z)));
    }
    g = groups;
#else
    unpack3(codes, n * groups, groups, s);
    unpack3(codes, (N + n) * groups, groups, nz);
#endif
    for (; g < groups; ++g) {
      const float sc = s[g] * static_cast<float>(stat_scale_p[b0 + g]) + static_cast<float>(stat_zero_p[b0 + g]);
      const float z = nz[g] * static_cast<float>(stat_scale_p[b1 + g]) + static_cast<float>(stat_zero_p[b1 + g]);
      s[g] = sc > 0.f ? sc : 1e-8f;
      nz[g] = -s[g] * z;
    }
    for (g = groups; g < groups + 16; ++g) s[g] = nz[g] = 0.f;
  }

#ifdef LOWBIT_AVX512
  // 16 SpQR statistic codes from code i (a multiple of 8) as float32 lanes: 6 bytes read big-endian into one
  // 64-bit word, shifted per lane (never past the 2 x N x groups codes stored).
  __m512 codes3_x16(const uint8_t* p, int64_t i) const {
    const int64_t byte = 3 * (i / 8), stored = 3 * ((2 * N * groups + 7) / 8);
    uint64_t v = 0;
    if (byte + 8 <= stored) std::memcpy(&v, p + byte, 8);  // bytes 6 and 7 land below every shift's 3 bits
    else std::memcpy(&v, p + byte, static_cast<size_t>(std::min<int64_t>(6, stored - byte)));
    const __m512i w = _mm512_set1_epi64(static_cast<int64_t>(__builtin_bswap64(v)));
    const __m512i seven = _mm512_set1_epi64(7);
    const __m512i lo = _mm512_and_si512(_mm512_srlv_epi64(w, _mm512_setr_epi64(61, 58, 55, 52, 49, 46, 43, 40)), seven);
    const __m512i hi = _mm512_and_si512(_mm512_srlv_epi64(w, _mm512_setr_epi64(37, 34, 31, 28, 25, 22, 19, 16)), seven);
    const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(lo)), _mm512_cvtepi64_epi32(hi), 1);
    return _mm512_cvtepi32_ps(both);
  }
#endif

  // Codes [i0, i0 + count) of packed 3-bit codes as floats, a whole 24-bit word at a time where aligned.
  static void unpack3(const uint8_t* p, int64_t i0, int64_t count, float* out) {
    int64_t i = i0;
    const int64_t end = i0 + count;
    for (; i < end && i % 8; ++i) *out++ = static_cast<float>(code3(p, i));
    for (; i + 8 <= end; i += 8) {
      const uint32_t word = word24(p, i / 8);
      for (int j = 0; j < 8; ++j) *out++ = static_cast<float>((word >> (21 - 3 * j)) & 7);
    }
    for (; i < end; ++i) *out++ = static_cast<float>(code3(p, i));
  }

  bool has_outliers() const { return rowptr_p != nullptr; }

  // Big-endian 24-bit word w of packed 3-bit codes (codes 8w .. 8w + 7, the first in the high bits).
  static uint32_t word24(const uint8_t* p, int64_t w) {
    const uint8_t* b = p + 3 * w;
    return uint32_t{b[0]} << 16 | uint32_t{b[1]} << 8 | b[2];
  }

  // Code i of 3-bit codes packed eight to a big-endian 24-bit word.
  static int code3(const uint8_t* p, int64_t i) {
    return static_cast<int>((word24(p, i / 8) >> (21 - 3 * (i % 8))) & 7);
  }

  // Code of weight k in a row (shifts, not divisions: this runs per outlier).
  int code_at(const uint8_t* row, int64_t k) const {
    if (bits == 3) return code3(row, k);
    if (bits == 4) return (row[k >> 1] >> (4 * (1 - (k & 1)))) & 15;
    return (row[k >> 2] >> (2 * (3 - (k & 3)))) & 3;
  }

  int block_shift = -1;  // log2(block) when block is a power of two
  int64_t group_of(int64_t k) const { return block_shift >= 0 ? k >> block_shift : k / block; }

  // Element (within its lane) that shift s of a lane holds; its own inverse.
  int64_t lane_elem(int64_t s) const {
    if (bits == 3) return 7 - s;
    const int64_t per_byte = 8 / bits;
    return (s / per_byte) * per_byte + (per_byte - 1 - s % per_byte);
  }

  // Position of weight k of a row in the lane order.
  int64_t lane_pos(int64_t k) const {
    const int64_t L = lane_elems(), E = chunk(), r = k % E;
    return k / E * E + lane_elem(r % L) * 16 + r / L;
  }

  // Value of weight k of row n (row constants s, nz of that row).
  float value(const uint8_t* row, int64_t k, const float* s, const float* nz) const {
    const int64_t g = group_of(k);
    return lut[code_at(row, k)] * s[g] + (has_zero() ? nz[g] : 0.f);
  }

  // The outliers of row n: y[m, n] += (outlier - coded weight) * x[m, k] for the MB rows of x at x (stride K).
  int64_t col(int64_t j) const { return cols16_p ? cols16_p[j] : cols32_p[j]; }

  void add_outliers(int64_t n, const uint8_t* row, const float* s, const float* nz, const float* x, int64_t MB,
                    float* y, int64_t ldy) const {
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int64_t m0 = 0; m0 < MB; m0 += 4) {
      const int64_t mb = std::min<int64_t>(4, MB - m0);
      for (int32_t j = rowptr_p[n]; j < rowptr_p[n + 1]; ++j) {
        const int64_t k = col(j);
        const float d = static_cast<float>(values_p[j]) - value(row, k, s, nz);
        for (int64_t m = 0; m < mb; ++m) acc[m] += d * x[(m0 + m) * K + k];
      }
      for (int64_t m = 0; m < mb; ++m) y[(m0 + m) * ldy + n] += acc[m], acc[m] = 0.f;
    }
  }
};

LutFormat make_format(torch::Tensor packed, int64_t N, int64_t K, int64_t bits, torch::Tensor lut, int64_t block,
                      torch::Tensor scale, c10::optional<torch::Tensor> zero,
                      c10::optional<torch::Tensor> nested_absmax, c10::optional<torch::Tensor> nested_table,
                      double offset, int64_t nested_block, c10::optional<torch::Tensor> stat_scale,
                      c10::optional<torch::Tensor> stat_zero, int64_t stat_group,
                      c10::optional<torch::Tensor> rowptr, c10::optional<torch::Tensor> cols,
                      c10::optional<torch::Tensor> values) {
  TORCH_CHECK(bits == 4 || bits == 3 || bits == 2, "LUT kernels take 4-, 3- or 2-bit codes");
  TORCH_CHECK(K * bits % 8 == 0 && (bits != 3 || K % 8 == 0), "rows must start on a byte (3-bit: on a 24-bit word)");
  LutFormat f;
  f.N = N, f.K = K, f.bits = bits, f.row_bytes = K * bits / 8, f.block = block;
  TORCH_CHECK(block > 0 && N >= 0 && K >= 0, "block must be positive");
  f.groups = (K + block - 1) / block;
  if ((block & (block - 1)) == 0)
    while ((int64_t{1} << ++f.block_shift) < block) {}
  TORCH_CHECK(block % f.lane_elems() == 0 && (f.chunk() % block == 0 || block % f.chunk() == 0),
              "block size does not fit the kernel's lanes");
  TORCH_CHECK(packed.is_contiguous() && packed.dtype() == torch::kUInt8 && packed.numel() >= N * f.row_bytes,
              "packed must be contiguous uint8 holding N rows");
  f.packed = packed.data_ptr<uint8_t>();
  TORCH_CHECK(lut.dtype() == torch::kFloat32 && lut.numel() == 16, "lut must be 16 float32");
  lut = lut.contiguous();
  std::memcpy(f.lut, lut.data_ptr<float>(), sizeof(f.lut));
  TORCH_CHECK(scale.is_contiguous() && (stat_scale.has_value() || scale.numel() == N * f.groups),
              "scale must hold N x groups");
  f.scale = scale;
  if (stat_scale.has_value()) {
    const int64_t blocks = stat_group > 0 ? (N + stat_group - 1) / stat_group : 0;
    TORCH_CHECK(stat_group > 0 && stat_zero.has_value() && scale.scalar_type() == torch::kUInt8 &&
                    scale.numel() == 3 * ((2 * N * f.groups + 7) / 8),
                "SpQR statistics need stat_group and the packed 3-bit codes of 2 x N x groups");
    f.stat_scale = stat_scale->contiguous();
    f.stat_zero = stat_zero->contiguous();
    TORCH_CHECK(f.stat_scale.scalar_type() == torch::kFloat16 && f.stat_zero.scalar_type() == torch::kFloat16 &&
                    f.stat_scale.numel() == 2 * blocks * f.groups && f.stat_zero.numel() == 2 * blocks * f.groups,
                "SpQR second-level statistics must be float16 [2, row blocks, groups]");
    f.stat_scale_p = f.stat_scale.data_ptr<c10::Half>();
    f.stat_zero_p = f.stat_zero.data_ptr<c10::Half>();
    f.stat_group = stat_group;
  } else if (scale.scalar_type() == torch::kUInt8) {
    TORCH_CHECK(nested_absmax.has_value() && nested_table.has_value() && nested_block > 0,
                "uint8 scales need the nested absmax, table and block");
    f.nested_absmax = nested_absmax->contiguous();
    f.nested_table = nested_table->contiguous();
    TORCH_CHECK(f.nested_table.numel() == 256 && f.nested_absmax.numel() * nested_block >= N * f.groups,
                "nested constants do not fit");
  } else {
    TORCH_CHECK(scale.scalar_type() == torch::kFloat32 || scale.scalar_type() == torch::kFloat16,
                "scale must be float32, float16 or uint8");
  }
  if (zero.has_value()) {
    TORCH_CHECK(zero->is_contiguous() && zero->numel() == N * f.groups &&
                    (zero->scalar_type() == torch::kFloat32 || zero->scalar_type() == torch::kUInt8),
                "zero must be contiguous float32 or uint8 of N x groups");
    f.zero = *zero;
  }
  f.offset = offset;
  f.nested_block = nested_block;
  f.zero_term = f.zero.defined() || f.stat_group;
  f.scale_p = f.scale.data_ptr();
  f.zero_p = f.zero.defined() ? f.zero.data_ptr() : nullptr;
  if (!f.stat_group) f.scale_bytes = f.groups * static_cast<int64_t>(f.scale.element_size());
  if (f.zero.defined()) f.zero_bytes = f.groups * static_cast<int64_t>(f.zero.element_size());
  if (f.nested_absmax.defined()) {
    f.nested_absmax_p = f.nested_absmax.data_ptr<float>();
    f.nested_table_p = f.nested_table.data_ptr<float>();
  }
  if (rowptr.has_value()) {
    TORCH_CHECK(cols.has_value() && values.has_value(), "outliers need rowptr, cols and values");
    f.rowptr = rowptr->contiguous(), f.cols = cols->contiguous(), f.values = values->contiguous();
    TORCH_CHECK(f.rowptr.scalar_type() == torch::kInt32 && f.rowptr.numel() == N + 1 &&
                    (f.cols.scalar_type() == torch::kInt16 || f.cols.scalar_type() == torch::kInt32) &&
                    f.values.scalar_type() == torch::kFloat16 && f.cols.numel() == f.values.numel(),
                "outliers must be rowptr int32 [N + 1], cols int16/int32 and values float16 of one length");
    const int32_t* rp = f.rowptr.data_ptr<int32_t>();
    TORCH_CHECK(rp[0] == 0 && rp[N] == f.values.numel(), "outlier rowptr does not match the outlier count");
    // Every row's outliers are checked, once per plan.
    bool ok = true;
    for (int64_t n = 0; n < N; ++n) ok &= rp[n] <= rp[n + 1];
    TORCH_CHECK(ok, "outlier rowptr must not decrease");
    if (f.cols.scalar_type() == torch::kInt16) f.cols16_p = f.cols.data_ptr<int16_t>();
    else f.cols32_p = f.cols.data_ptr<int32_t>();
    // A corrupt file must not read past x (plain loops over one type, so that they vectorize).
    const int64_t j0 = 0, j1 = rp[N];
    if (f.cols16_p) for (int64_t j = j0; j < j1; ++j) ok &= f.cols16_p[j] >= 0 && f.cols16_p[j] < K;
    else for (int64_t j = j0; j < j1; ++j) ok &= f.cols32_p[j] >= 0 && f.cols32_p[j] < K;
    TORCH_CHECK(ok, "outlier columns out of range");
    f.rowptr_p = rp;
    f.values_p = f.values.data_ptr<c10::Half>();
  }
  return f;
}

// x [M, K] float32 -> [M, Kp] in lane order (zero padded), and per-lane sums [M, Kp / lane_elems].
void permute_x(const LutFormat& f, const float* x, int64_t M, float* xp, float* lane_sum) {
  const int64_t L = f.lane_elems(), E = f.chunk(), Kp = f.padded_k();
  int64_t pos[16];
  for (int64_t s = 0; s < L; ++s) pos[s] = f.lane_elem(s);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * f.K;
    float* out = xp + m * Kp;
    float* ls = lane_sum + m * (Kp / L);
    for (int64_t c = 0; c < Kp; c += E) {
      const bool whole = c + E <= f.K;
      for (int64_t l = 0; l < 16; ++l) {
        const int64_t base = c + L * l;
        float sum = 0.f;
        for (int64_t s = 0; s < L; ++s) {
          const float v = whole || base + pos[s] < f.K ? xr[base + pos[s]] : 0.f;
          out[c + s * 16 + l] = v;
          sum += v;
        }
        ls[c / L + l] = sum;
      }
    }
  }
}

#ifdef LOWBIT_AVX512
// Per-lane block constants of chunk c: lanes share a block when the block is wider than a lane.
struct LaneConstants {
  __m512i idx;
  int64_t per_chunk = 0;  // blocks per chunk, when a chunk holds several
  int chunk_shift = -1;   // log2(chunks per block), when a block holds several chunks (a power of two)
  int64_t chunks_per_block = 1;
  explicit LaneConstants(const LutFormat& f) {
    const int64_t E = f.chunk(), L = f.lane_elems();
    alignas(64) int32_t id[16];
    for (int l = 0; l < 16; ++l) id[l] = f.block >= E ? 0 : static_cast<int32_t>(L * l / f.block);
    idx = _mm512_load_si512(id);
    if (f.block < E) {
      per_chunk = E / f.block;
    } else {
      chunks_per_block = f.block / E;
      if ((chunks_per_block & (chunks_per_block - 1)) == 0)
        for (chunk_shift = 0; (int64_t{1} << chunk_shift) < chunks_per_block;) ++chunk_shift;
    }
  }
  inline __m512 get(const float* v, int64_t c) const {
    if (per_chunk) return _mm512_permutexvar_ps(idx, _mm512_loadu_ps(v + c * per_chunk));
    return _mm512_set1_ps(v[chunk_shift >= 0 ? c >> chunk_shift : c / chunks_per_block]);
  }
};

// Chunk c of a row's codes as 16 int32 lanes: 64 bytes (2-, 4-bit), or 48 bytes whose 24-bit words are spread one
// to a lane (3-bit); bytes past the row read as 0.
template <int BITS>
inline __m512i load_chunk(const uint8_t* row, int64_t c, int64_t row_bytes) {
  constexpr int64_t CB = BITS == 3 ? 48 : 64;
  const int64_t left = row_bytes - c * CB;
  const uint8_t* p = row + c * CB;
  if (BITS != 3 && left >= 64) return _mm512_loadu_si512(p);
  const int64_t n = std::min(left, CB);  // < 64: 64-byte rows with 64 bytes left returned above
  const __m512i raw = _mm512_maskz_loadu_epi8((__mmask64)((1ULL << n) - 1), p);
  if (BITS != 3) return raw;
  // 128-bit lane i takes bytes 12i..12i+11 (four words), then each word's 3 bytes go big-endian into an int32.
  const __m512i spread = _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 1, 2, 0, 3, 4, 5, 0, 6, 7, 8, 0, 9, 10, 11, 0), raw);
  const __m512i order = _mm512_broadcast_i32x4(_mm_setr_epi32(int32_t(0x80000102), int32_t(0x80030405),
                                                              int32_t(0x80060708), int32_t(0x80090A0B)));
  return _mm512_shuffle_epi8(spread, order);
}

// Rows [n0, n1) of y[M, N] for MB rows of x at once (the weights are decoded once for all MB). Shift sh sums into
// chain sh % CH (fma_chains).
template <int MB, int BITS, typename XT>
void lut_rows(const LutFormat& f, const XT* xp, const float* ls, int64_t Kp, const float* x, float* y, int64_t ldy,
              int64_t n0, int64_t n1, float* s, float* nz) {
  // XT float: the float32 kernel, S shifts of 16 weights per chunk; XT uint16_t: the bf16-dot kernel (below), S
  // shifts of 32. Either way float32 lane j of a chunk sums the same L weights, so constants and lane sums agree.
  constexpr bool BF = std::is_same<XT, uint16_t>::value;
  constexpr int S = BF ? 16 / BITS : (BITS == 3 ? 8 : 32 / BITS), CH = fma_chains<MB>();
  constexpr int64_t W = BF ? 32 : 16;  // weights a shift decodes
  const int64_t E = W * S, chunks = Kp / E, L = f.lane_elems();
  alignas(64) uint16_t table[32];
  for (int i = 0; i < 32; ++i) table[i] = c10::BFloat16(f.lut[i % (1 << BITS)]).x;
  const __m512i lut16 = _mm512_load_si512(table);
  const __m512 lutv = _mm512_loadu_ps(f.lut);
  const LaneConstants lanes(f);
  const bool zero = f.has_zero();
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = f.packed + n * f.row_bytes;
    f.prefetch_constants(n);
    f.row_constants(n, s, nz);
    __m512 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      prefetch_ahead(row + c * (BITS == 3 ? 48 : 64));
      const __m512i v = load_chunk<BITS>(row, c, f.row_bytes);
      __m512 sum[CH][MB];
      for (int h = 0; h < CH; ++h)
        for (int m = 0; m < MB; ++m) sum[h][m] = _mm512_setzero_ps();
#pragma GCC unroll 16
      for (int sh = 0; sh < S; ++sh) {
        const XT* xs = xp + c * E + sh * W;
        if constexpr (BF) {
#ifdef __AVX512BF16__
          const __m512bh w = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, BITS * sh), lut16);
          for (int m = 0; m < MB; ++m)
            sum[sh % CH][m] = _mm512_dpbf16_ps(sum[sh % CH][m], w, (__m512bh)_mm512_loadu_si512(xs + m * Kp));
#endif
        } else {
          const __m512 w = _mm512_permutexvar_ps(_mm512_srli_epi32(v, BITS * sh), lutv);
          for (int m = 0; m < MB; ++m) sum[sh % CH][m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xs + m * Kp), sum[sh % CH][m]);
        }
      }
      const __m512 sv = lanes.get(s, c);
      for (int m = 0; m < MB; ++m) acc[m] = _mm512_fmadd_ps(add_chains<CH>(sum, m), sv, acc[m]);
      if (zero) {
        const __m512 zv = lanes.get(nz, c);
        for (int m = 0; m < MB; ++m) acc[m] = _mm512_fmadd_ps(zv, _mm512_loadu_ps(ls + m * (Kp / L) + c * 16), acc[m]);
      }
    }
    for (int m = 0; m < MB; ++m) y[m * ldy + n] = _mm512_reduce_add_ps(acc[m]);
    if (f.has_outliers()) f.add_outliers(n, row, s, nz, x, MB, y, ldy);
  }
}
#endif

#if defined(LOWBIT_AVX512) && defined(__AVX512BF16__)
// The bf16-dot variant for layers that compute in bf16 (4- and 2-bit codes): a chunk's 64 bytes read as 32 16-bit
// words, vpermw looks up 32 weights at once in a 32-entry bf16 table (the 16 or 4 codes repeated, so the bits above
// a code are ignored), and vdpbf16ps multiplies 32 pairs with bf16 x into float32 lanes: half the instructions of
// the float32 kernel per weight (NF4 4096 x 11008, 2 threads, CPU C: 0.55 against 0.80 ms). Weight
// lane j of the float32 kernel (its lane_elems weights) is float32 lane j here too, so the block constants and lane
// sums are the same; x and the table are rounded to bf16 (bitsandbytes' fused CPU kernel does the same).
// x [M, K] -> bf16 [M, Kp]: word w of shift s of chunk c is weight c*E + w*P + lane_elem(s), P codes a word; and the
// lane sums of the rounded x (the zero-point term then rounds x as the codes' term does: the two nearly cancel).
void permute_x_bf16(const LutFormat& f, const float* x, int64_t M, uint16_t* xp, float* lane_sum) {
  const int64_t P = 16 / f.bits, E = f.chunk(), Kp = f.padded_k(), L = f.lane_elems();
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * f.K;
    uint16_t* out = xp + m * Kp;
    float* ls = lane_sum + m * (Kp / L);
    for (int64_t c = 0; c < Kp; c += E) {
      float sums[16] = {};
      for (int64_t sh = 0; sh < P; ++sh) {
        const int64_t e = f.lane_elem(sh);
        for (int64_t w = 0; w < 32; ++w) {
          const int64_t k = c + w * P + e;
          const c10::BFloat16 v(k < f.K ? xr[k] : 0.f);  // round to nearest even
          out[c + sh * 32 + w] = v.x;
          sums[w / 2] += static_cast<float>(v);
        }
      }
      std::memcpy(ls + c / L, sums, sizeof(sums));
    }
  }
}

#endif

// Plain C++ for machines without AVX-512: the same sums in the natural order.
void lut_rows_scalar(const LutFormat& f, const float* x, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1,
                     float* s, float* nz) {
  for (int64_t n = n0; n < n1; ++n) {
    f.row_constants(n, s, nz);
    const uint8_t* row = f.packed + n * f.row_bytes;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * f.K;
      float acc = 0.f;
      for (int64_t g = 0; g < f.groups; ++g) {
        float dot = 0.f, xs = 0.f;
        const int64_t k1 = std::min(f.K, (g + 1) * f.block);
        for (int64_t k = g * f.block; k < k1; ++k) {
          dot += f.lut[f.code_at(row, k)] * xr[k];
          xs += xr[k];
        }
        acc += dot * s[g] + (f.has_zero() ? nz[g] * xs : 0.f);
      }
      y[m * ldy + n] = acc;
    }
    if (f.has_outliers()) f.add_outliers(n, row, s, nz, x, M, y, ldy);
  }
}

#if defined(LOWBIT_AVX512) && defined(__AVX512VNNI__)
// Integer activations (rows.h, LutRowInput with int8_x): x quantized to int8 per block of 8 (absmax / 127, as
// llama.cpp's Q8_0 does per 32), 4-bit codes looked up as bytes in a 16-entry integer table (vpshufb), and vpdpbusd summing
// four byte products into each int32 lane: about half the instructions of the float32 kernel per weight. The table
// holds the codes' values exactly where they are integers in [-127, 127] (int4 groups, GGUF Q4_0/Q4_1), else
// round(127 * lut / max|lut|) (NF4, FP4). vpdpbusd multiplies unsigned by signed bytes: the table is stored + 128
// and 128 * (the lane's sum of x codes) taken off after. Lane l of chunk c holds weights 128c + 8l .. + 7: the
// high nibbles (even weights) meet x's even codes, the low nibbles the odd ones. The zero-point term keeps
// float32 x (its lane sums), as the float kernel does.
//
// A table that is not integral (NF4, FP4) is two tables: hi = round(m * lut) and lo = round(254 * (m * lut - hi)),
// each a pass of vpdpbusd; hi + lo / 254 carries the codes' values to 1 / 32258 of the largest, where hi alone
// (1 / 254) was the larger part of the error (NF4 SmolLM2 layers: 5e-3 of the output's norm from the table, 4e-3
// from x's rounding).
constexpr float kLoScale = 254.f;

struct Q8Table {
  __m512i hi, lo;
  float inv_mult;
  bool two;
};

Q8Table q8_table(const LutFormat& f) {
  float most = 0.f;
  bool integral = true;
  for (int i = 0; i < 16; ++i) {
    most = std::max(most, std::fabs(f.lut[i]));
    integral &= f.lut[i] == std::nearbyint(f.lut[i]);
  }
  const bool exact = integral && most <= 127.f;
  const float mult = exact ? 1.f : (most > 0.f ? 127.f / most : 1.f);
  alignas(16) uint8_t hi[16], lo[16];
  for (int i = 0; i < 16; ++i) {
    const float v = f.lut[i] * mult, h = std::nearbyint(v);
    hi[i] = static_cast<uint8_t>(static_cast<int>(h) + 128);
    lo[i] = static_cast<uint8_t>(static_cast<int>(std::nearbyint((v - h) * kLoScale)) + 128);
  }
  return {_mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(hi))),
          _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(lo))), 1.f / mult, !exact};
}

// Sum of byte products of a chunk's weights (looked up in `table` + 128) with x's codes, 128 * x's sums taken off.
inline __m512i q8_chunk(__m512i table, __m512i hi_idx, __m512i lo_idx, const int8_t* xq, __m512i xs128) {
  __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_shuffle_epi8(table, hi_idx), _mm512_loadu_si512(xq));
  d = _mm512_dpbusd_epi32(d, _mm512_shuffle_epi8(table, lo_idx), _mm512_loadu_si512(xq + 64));
  return _mm512_sub_epi32(d, xs128);
}

template <bool TWO>
void lut_rows_q8(const LutFormat& f, const Q8Table& table, const int8_t* xq, const int32_t* xs128, const float* dx,
                 const float* ls, float* y, int64_t n0, int64_t n1, float* s, float* nz) {
  const int64_t chunks = f.padded_k() / 128;
  const LaneConstants lanes(f);
  const bool zero = f.has_zero();
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512 lo_scale = _mm512_set1_ps(1.f / kLoScale);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = f.packed + n * f.row_bytes;
    f.prefetch_constants(n);
    f.row_constants(n, s, nz);
    __m512 accq = _mm512_setzero_ps(), accz = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      prefetch_ahead(row + c * 64);
      const __m512i v = load_chunk<4>(row, c, f.row_bytes);
      const __m512i hi_idx = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4), lo_idx = _mm512_and_si512(v, low4);
      const __m512i sums = _mm512_loadu_si512(xs128 + c * 16);
      __m512 dot = _mm512_cvtepi32_ps(q8_chunk(table.hi, hi_idx, lo_idx, xq + c * 128, sums));
      if constexpr (TWO)
        dot = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q8_chunk(table.lo, hi_idx, lo_idx, xq + c * 128, sums)), lo_scale, dot);
      accq = _mm512_fmadd_ps(dot, _mm512_mul_ps(lanes.get(s, c), _mm512_loadu_ps(dx + c * 16)), accq);
      if (zero) accz = _mm512_fmadd_ps(lanes.get(nz, c), _mm512_loadu_ps(ls + c * 16), accz);
    }
    y[n] = _mm512_reduce_add_ps(accq) * table.inv_mult + _mm512_reduce_add_ps(accz);
  }
}

void lut_rows_q8(const LutFormat& f, const int8_t* xq, const int32_t* xs128, const float* dx, const float* ls,
                 float* y, int64_t n0, int64_t n1, float* s, float* nz) {
  const Q8Table table = q8_table(f);
  if (table.two) lut_rows_q8<true>(f, table, xq, xs128, dx, ls, y, n0, n1, s, nz);
  else lut_rows_q8<false>(f, table, xq, xs128, dx, ls, y, n0, n1, s, nz);
}
#endif

}  // namespace

namespace {
// y_i [M, N_i] = x [M, K] @ W_i^T for several weights of the same K in one parallel region over all their rows
// (q, k and v, or gate and up, of a decoder layer: one fork and join instead of three), each on the float32
// kernel or (bf16_dot) the bf16-dot one.
std::vector<torch::Tensor> lut_gemv_impl(const std::vector<const LutFormat*>& fs, const std::vector<bool>& bf16,
                                         torch::Tensor x) {
  const int64_t K = fs[0]->K;
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.size(1) == K, "x must be float32 [M, K]");
  x = x.contiguous();
  const int64_t M = x.size(0), P = static_cast<int64_t>(fs.size());
  std::vector<torch::Tensor> ys;
  std::vector<int64_t> first(P + 1, 0);  // weight i's rows are [first[i], first[i + 1]) of all rows
  for (int64_t i = 0; i < P; ++i) {
    TORCH_CHECK(fs[i]->K == K, "the weights of one call must share K");
    ys.push_back(torch::empty({M, fs[i]->N}, torch::kFloat32));
    first[i + 1] = first[i] + fs[i]->N;
  }
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
  const float* px = x.data_ptr<float>();
#ifdef LOWBIT_AVX512
  // x in each weight's lane order (float32, or bf16 for the bf16-dot kernel), and its lane sums
  std::vector<std::vector<float>> xp(P), ls(P);
  std::vector<std::vector<uint16_t>> xb(P);
  for (int64_t i = 0; i < P; ++i) {
    const LutFormat& f = *fs[i];
    const int64_t Kp = f.padded_k();
    ls[i].resize(M * Kp / f.lane_elems());
#ifdef __AVX512BF16__
    if (bf16[i]) {
      xb[i].resize(M * Kp);
      permute_x_bf16(f, px, M, xb[i].data(), ls[i].data());
      continue;
    }
#endif
    TORCH_CHECK(!bf16[i], "this build has no bf16-dot kernel");
    xp[i].resize(M * Kp);
    permute_x(f, px, M, xp[i].data(), ls[i].data());
  }
#endif
  at::parallel_for(0, first[P], grain, [&](int64_t r0, int64_t r1) {
    for (int64_t i = 0; i < P; ++i) {
      const LutFormat& f = *fs[i];
      const int64_t n0 = std::max(r0, first[i]) - first[i], n1 = std::min(r1, first[i + 1]) - first[i];
      if (n0 >= n1) continue;
      const int64_t N = f.N;
      float* py = ys[i].data_ptr<float>();
      std::vector<float> s(f.groups + 32), nz(f.groups + 32);
#ifdef LOWBIT_AVX512
      const int64_t Kp = f.padded_k();
      for_x_blocks(M, [&](int64_t m0, auto mb) {
        constexpr int MB = decltype(mb)::value;
        const float* lm = ls[i].data() + m0 * (Kp / f.lane_elems());
        const float* xo = px + m0 * K;
        float* ym = py + m0 * N;
#ifdef __AVX512BF16__
        if (bf16[i]) {
          const uint16_t* xm = xb[i].data() + m0 * Kp;
          if (f.bits == 4) lut_rows<MB, 4>(f, xm, lm, Kp, xo, ym, N, n0, n1, s.data(), nz.data());
          else lut_rows<MB, 2>(f, xm, lm, Kp, xo, ym, N, n0, n1, s.data(), nz.data());
          return;
        }
#endif
        const float* xm = xp[i].data() + m0 * Kp;
        if (f.bits == 4) lut_rows<MB, 4>(f, xm, lm, Kp, xo, ym, N, n0, n1, s.data(), nz.data());
        else if (f.bits == 3) lut_rows<MB, 3>(f, xm, lm, Kp, xo, ym, N, n0, n1, s.data(), nz.data());
        else lut_rows<MB, 2>(f, xm, lm, Kp, xo, ym, N, n0, n1, s.data(), nz.data());
      });
#else
      lut_rows_scalar(f, px, M, py, N, n0, n1, s.data(), nz.data());
#endif
    }
  });
  return ys;
}

torch::Tensor lut_gemv_one(const LutFormat& f, torch::Tensor x, bool bf16_dot) {
  return lut_gemv_impl({&f}, {bf16_dot}, x)[0];
}
}  // namespace

// A LUT weight bound once for the GEMVs of a decode loop: make_format's checks are taken at construction, and
// each call passes x only (a small layer's call took 4.7 us when every call passed all 18 arguments, 2 us of it
// there). The layer's buffers must stay as they are while the plan is used.
namespace {
std::shared_ptr<LutPlan> make_plan(LutFormat f, torch::Tensor packed, bool bf16_dot) {
#if !(defined(LOWBIT_AVX512) && defined(__AVX512BF16__))
  TORCH_CHECK(!bf16_dot, "this build has no bf16-dot kernel");
#endif
  TORCH_CHECK(!bf16_dot || f.bits == 4 || f.bits == 2, "the bf16-dot kernel takes 4- or 2-bit codes");
  auto plan = std::make_shared<LutPlan>();
  plan->format = std::make_shared<const LutFormat>(std::move(f));
  plan->packed = packed;
  plan->bf16_dot = bf16_dot;
  return plan;
}
}  // namespace

std::shared_ptr<LutPlan> LutPlan::plain(bool bf16_dot, torch::Tensor packed, int64_t N, int64_t K, int64_t bits,
                                        torch::Tensor lut, int64_t block, torch::Tensor scale,
                                        c10::optional<torch::Tensor> zero) {
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 || scale.scalar_type() == torch::kFloat16,
              "scale must be float32 or float16");
  return make_plan(make_format(packed, N, K, bits, lut, block, scale, zero, c10::nullopt, c10::nullopt, 0.0, 0,
                               c10::nullopt, c10::nullopt, 0, c10::nullopt, c10::nullopt, c10::nullopt),
                   packed, bf16_dot);
}

std::shared_ptr<LutPlan> LutPlan::double_quant(bool bf16_dot, torch::Tensor packed, int64_t N, int64_t K,
                                               torch::Tensor lut, int64_t block, torch::Tensor codes,
                                               torch::Tensor nested_absmax, torch::Tensor nested_table, double offset,
                                               int64_t nested_block) {
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8, "double-quantized absmax codes must be uint8");
  return make_plan(make_format(packed, N, K, 4, lut, block, codes, c10::nullopt, nested_absmax, nested_table, offset,
                               nested_block, c10::nullopt, c10::nullopt, 0, c10::nullopt, c10::nullopt, c10::nullopt),
                   packed, bf16_dot);
}

std::shared_ptr<LutPlan> LutPlan::spqr(bool bf16_dot, torch::Tensor packed, int64_t N, int64_t K, int64_t bits, torch::Tensor lut,
                                       int64_t block, torch::Tensor stat_codes, torch::Tensor stat_scale,
                                       torch::Tensor stat_zero, int64_t stat_group,
                                       c10::optional<torch::Tensor> rowptr, c10::optional<torch::Tensor> cols,
                                       c10::optional<torch::Tensor> values) {
  return make_plan(make_format(packed, N, K, bits, lut, block, stat_codes, c10::nullopt, c10::nullopt, c10::nullopt,
                               0.0, 0, stat_scale, stat_zero, stat_group, rowptr, cols, values),
                   packed, bf16_dot);
}

torch::Tensor LutPlan::gemv(torch::Tensor x) const {
  return lut_gemv_one(*static_cast<const LutFormat*>(format.get()), x, bf16_dot);
}

// The plans' products with one x in one parallel region: [x @ W_i^T for each plan].
std::vector<torch::Tensor> lut_gemv_many(const std::vector<std::shared_ptr<LutPlan>>& plans, torch::Tensor x) {
  TORCH_CHECK(!plans.empty(), "no plans");
  std::vector<const LutFormat*> fs;
  std::vector<bool> bf16;
  for (const auto& p : plans) fs.push_back(static_cast<const LutFormat*>(p->format.get())), bf16.push_back(p->bf16_dot);
  return lut_gemv_impl(fs, bf16, x);
}

// x [M, K] float32 in the lane order of a LUT format with these bits (for LutPlan::dequant_rows tiles).
torch::Tensor lut_permute_x(torch::Tensor x, int64_t bits) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "x must be float32 [M, K]");
  x = x.contiguous();
  LutFormat f;
  f.bits = bits, f.K = x.size(1);
  const int64_t M = x.size(0), Kp = f.padded_k();
  auto xp = torch::empty({M, Kp}, torch::kFloat32);
  std::vector<float> ls(M * Kp / f.lane_elems());
  permute_x(f, x.data_ptr<float>(), M, xp.data_ptr<float>(), ls.data());
  return xp;
}

namespace {
#ifdef LOWBIT_AVX512
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
// float32 -> bfloat16 rounding to nearest even, as torch converts (weights are finite).
inline void store16(c10::BFloat16* p, __m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}
#endif

template <typename T>
void dequant_rows_impl(const LutFormat& f, int64_t r0, int64_t r1, T* out, int64_t Kp) {
  const int64_t L = f.lane_elems(), E = f.chunk();
  at::parallel_for(r0, r1, 1, [&](int64_t n0, int64_t n1) {
    std::vector<float> s(f.groups + 32), nz(f.groups + 32);
    for (int64_t n = n0; n < n1; ++n) {
      f.row_constants(n, s.data(), nz.data());
      const uint8_t* row = f.packed + n * f.row_bytes;
      T* o = out + (n - r0) * Kp;
#ifdef LOWBIT_AVX512
      {
        const __m512 lutv = _mm512_loadu_ps(f.lut);
        const LaneConstants lanes(f);
        for (int64_t c = 0; c < Kp / E; ++c) {
          const __m512i v = f.bits == 3 ? load_chunk<3>(row, c, f.row_bytes) : load_chunk<4>(row, c, f.row_bytes);
          const __m512 sv = lanes.get(s.data(), c);
          const __m512 zv = f.has_zero() ? lanes.get(nz.data(), c) : _mm512_setzero_ps();
          for (int64_t sh = 0; sh < L; ++sh) {
            const __m512 w = _mm512_permutexvar_ps(_mm512_srli_epi32(v, static_cast<unsigned>(f.bits * sh)), lutv);
            store16(o + c * E + sh * 16, _mm512_fmadd_ps(w, sv, zv));
          }
        }
      }
#else
      for (int64_t kp = 0; kp < Kp; ++kp) {  // position kp of the lane order holds weight k
        const int64_t c = kp / E, sh = (kp % E) / 16, l = kp % 16;
        const int64_t k = c * E + L * l + f.lane_elem(sh);
        o[kp] = static_cast<T>(k < f.K ? f.value(row, k, s.data(), nz.data()) : 0.f);
      }
#endif
      if (!f.has_outliers()) continue;
      for (int32_t j = f.rowptr_p[n]; j < f.rowptr_p[n + 1]; ++j) {
        const int64_t k = f.col(j);
        o[f.lane_pos(k)] = static_cast<T>(static_cast<float>(f.values_p[j]));
      }
    }
  });
}
}  // namespace

// Rows [r0, r1) of W dequantized in lane order into out [r1 - r0, Kp] (float32 or bfloat16).
void LutPlan::dequant_rows(int64_t r0, int64_t r1, torch::Tensor out) const {
  const LutFormat& f = *static_cast<const LutFormat*>(format.get());
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= f.N, "bad row range");
  const int64_t Kp = f.padded_k();
  TORCH_CHECK(out.is_contiguous() && out.numel() >= (r1 - r0) * Kp, "out too small");
  if (out.dtype() == torch::kFloat32)
    dequant_rows_impl<float>(f, r0, r1, out.data_ptr<float>(), Kp);
  else if (out.dtype() == torch::kBFloat16)
    dequant_rows_impl<c10::BFloat16>(f, r0, r1, out.data_ptr<c10::BFloat16>(), Kp);
  else
    TORCH_CHECK(false, "out must be float32 or bfloat16");
}

namespace {
// Rows [n0, n1) of the int8 weight-only product for MB rows of x.
template <int MB>
void int8_rows(const float* px, const int8_t* pw, const float* ps, float* py, int64_t K, int64_t N, int64_t n0,
               int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = pw + n * K;
#ifdef LOWBIT_AVX512
    constexpr int CH = fma_chains<MB>();
    __m512 a[CH][MB];
    for (int h = 0; h < CH; ++h)
      for (int m = 0; m < MB; ++m) a[h][m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 * CH <= K; k += 16 * CH) {
      if (k % 64 == 0) prefetch_ahead(w + k);
      for (int h = 0; h < CH; ++h) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k + 16 * h));
        const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
        for (int m = 0; m < MB; ++m) a[h][m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(px + m * K + k + 16 * h), a[h][m]);
      }
    }
    for (; k < K; k += 16) {
      const __mmask16 mk = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
      const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, w + k)));
      for (int m = 0; m < MB; ++m) a[0][m] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mk, px + m * K + k), a[0][m]);
    }
    for (int m = 0; m < MB; ++m) py[m * N + n] = _mm512_reduce_add_ps(add_chains<CH>(a, m)) * ps[n];
#else
    for (int m = 0; m < MB; ++m) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += static_cast<float>(w[k]) * px[m * K + k];
      py[m * N + n] = acc * ps[n];
    }
#endif
  }
}

// float32 weight rows: as int8_rows, the weight read straight. torch's GEMV on a row-major [N, K] weight reads
// it at about half the bandwidth (a 49152 x 576 LM head: 7.7 ms against 4.7 for the same weight transposed).
template <int MB>
void float_rows(const float* px, const float* pw, float* py, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* w = pw + n * K;
#ifdef LOWBIT_AVX512
    constexpr int CH = fma_chains<MB>();
    __m512 a[CH][MB];
    for (int h = 0; h < CH; ++h)
      for (int m = 0; m < MB; ++m) a[h][m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 * CH <= K; k += 16 * CH) {
      for (int h = 0; h < CH; ++h) {
        prefetch_ahead(w + k + 16 * h);
        const __m512 wv = _mm512_loadu_ps(w + k + 16 * h);
        for (int m = 0; m < MB; ++m) a[h][m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(px + m * K + k + 16 * h), a[h][m]);
      }
    }
    for (; k < K; k += 16) {
      const __mmask16 mk = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
      const __m512 wv = _mm512_maskz_loadu_ps(mk, w + k);
      for (int m = 0; m < MB; ++m) a[0][m] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mk, px + m * K + k), a[0][m]);
    }
    for (int m = 0; m < MB; ++m) py[m * N + n] = _mm512_reduce_add_ps(add_chains<CH>(a, m));
#else
    for (int m = 0; m < MB; ++m) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += w[k] * px[m * K + k];
      py[m * N + n] = acc;
    }
#endif
  }
}
}  // namespace

// y[M, N] = x[M, K] @ w^T for a float32 weight [N, K] (decode of full-precision layers: a few rows of x).
torch::Tensor float_gemv(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "x must be float32 [M, K]");
  TORCH_CHECK(w.dtype() == torch::kFloat32 && w.is_contiguous() && w.dim() == 2 && w.size(1) == x.size(1),
              "w must be contiguous float32 [N, K]");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, torch::kFloat32);
  const float* px = x.data_ptr<float>();
  const float* pw = w.data_ptr<float>();
  float* py = y.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, 8192 / std::max<int64_t>(K, 1)), [&](int64_t n0, int64_t n1) {
    for_x_blocks(M, [&](int64_t m0, auto mb) {
      float_rows<decltype(mb)::value>(px + m0 * K, pw, py + m0 * N, K, N, n0, n1);
    });
  });
  return y;
}

// y[M, N] = x[M, K] @ (codes * scale[row])^T for int8 codes [N, K] (weight-only int8, float32 x).
torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor codes, torch::Tensor row_scale) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "x must be float32 [M, K]");
  TORCH_CHECK(codes.dtype() == torch::kInt8 && codes.is_contiguous() && codes.dim() == 2 && codes.size(1) == x.size(1),
              "codes must be contiguous int8 [N, K]");
  TORCH_CHECK(row_scale.dtype() == torch::kFloat32 && row_scale.numel() == codes.size(0), "row_scale must be float32 [N]");
  x = x.contiguous();
  row_scale = row_scale.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0);
  auto y = torch::empty({M, N}, torch::kFloat32);
  const float* px = x.data_ptr<float>();
  const int8_t* pw = codes.data_ptr<int8_t>();
  const float* ps = row_scale.data_ptr<float>();
  float* py = y.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t n0, int64_t n1) {
    for_x_blocks(M, [&](int64_t m0, auto mb) {
      int8_rows<decltype(mb)::value>(px + m0 * K, pw, ps, py + m0 * N, K, N, n0, n1);
    });
  });
  return y;
}

// acc[M, N] = xq[M, K] @ codes[N, K]^T exactly in int32 (int8 x int8), as torch._int_mm; `code_sums` holds
// each row's sum of codes (the AVX-512 VNNI path multiplies x + 128 as unsigned and subtracts 128 * sum).
torch::Tensor int8_int8_gemv(torch::Tensor xq, torch::Tensor codes, torch::Tensor code_sums) {
  TORCH_CHECK(xq.dtype() == torch::kInt8 && xq.dim() == 2, "xq must be int8 [M, K]");
  TORCH_CHECK(codes.dtype() == torch::kInt8 && codes.is_contiguous() && codes.dim() == 2 && codes.size(1) == xq.size(1),
              "codes must be contiguous int8 [N, K]");
  TORCH_CHECK(code_sums.dtype() == torch::kInt32 && code_sums.numel() == codes.size(0), "code_sums must be int32 [N]");
  xq = xq.contiguous();
  const int64_t M = xq.size(0), K = xq.size(1), N = codes.size(0);
  auto acc = torch::empty({M, N}, torch::kInt32);
  const int8_t* px = xq.data_ptr<int8_t>();
  const int8_t* pw = codes.data_ptr<int8_t>();
  code_sums = code_sums.contiguous();
  const int32_t* sums = code_sums.data_ptr<int32_t>();
  int32_t* pa = acc.data_ptr<int32_t>();
#if defined(__AVX512VNNI__) && defined(LOWBIT_AVX512)
  std::vector<uint8_t> xu(M * K);
  for (int64_t i = 0; i < M * K; ++i) xu[i] = static_cast<uint8_t>(px[i] ^ 0x80);  // x + 128
#endif
  at::parallel_for(0, N, std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1)), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* w = pw + n * K;
      for (int64_t m = 0; m < M; ++m) {
#if defined(__AVX512VNNI__) && defined(LOWBIT_AVX512)
        const uint8_t* xm = xu.data() + m * K;
        __m512i a[4];  // four chains, as the float GEMVs (integer sums: any order gives the same)
        for (int h = 0; h < 4; ++h) a[h] = _mm512_setzero_si512();
        int64_t k = 0;
        for (; k + 256 <= K; k += 256) {
          for (int h = 0; h < 4; ++h) {
            if (m == 0) prefetch_ahead(w + k + 64 * h);
            a[h] = _mm512_dpbusd_epi32(a[h], _mm512_loadu_si512(xm + k + 64 * h), _mm512_loadu_si512(w + k + 64 * h));
          }
        }
        for (int h = 0; k < K; k += 64, h = (h + 1) % 4) {
          const __mmask64 mk = K - k >= 64 ? ~0ULL : ((1ULL << (K - k)) - 1);
          a[h] = _mm512_dpbusd_epi32(a[h], _mm512_maskz_loadu_epi8(mk, xm + k), _mm512_maskz_loadu_epi8(mk, w + k));
        }
        const __m512i t = _mm512_add_epi32(_mm512_add_epi32(a[0], a[1]), _mm512_add_epi32(a[2], a[3]));
        pa[m * N + n] = _mm512_reduce_add_epi32(t) - 128 * sums[n];
#else
        int32_t a = 0;
        for (int64_t k = 0; k < K; ++k) a += static_cast<int32_t>(px[m * K + k]) * w[k];
        pa[m * N + n] = a;
#endif
      }
    }
  });
  return acc;
}

std::vector<torch::Tensor> quantize_rowwise_int8(torch::Tensor x);
void zeropoint_row(const float* p, int64_t cols, int8_t* o, float& scale, int32_t& shift, float& absmax);

torch::Tensor ternary_gemv(torch::Tensor xq, torch::Tensor packed, int64_t N);

// Per-token absmax int8 activations times int8 weights (LLM.int8) or ternary ones (b1.58, uint8 packed 2 bits a
// weight), for a few rows of x in one call: as torch ops the quantization and scaling cost 0.1-0.3 ms per layer.
// Int8 with threshold > 0: the feature columns where any |x| >= threshold are taken out of the int8 product and
// multiplied in float32 with the dequantized weight columns. Returns y [M, N] = acc * x_absmax / 127 *
// row_scale (one per row, or one for all), plus the outlier product; x's row absmax; whether all are finite.
// zero_point (int8 weights): x rows quantized with a zero point instead (zeropoint_row), y = (acc +
// (128 - zero) * code_sum) * x_scale * row_scale.
std::tuple<torch::Tensor, torch::Tensor, bool> q8_gemv(torch::Tensor x, torch::Tensor weight,
                                                       c10::optional<torch::Tensor> code_sums, torch::Tensor row_scale,
                                                       double threshold, int64_t N, bool zero_point) {
  const bool ternary = weight.scalar_type() == torch::kUInt8;
  TORCH_CHECK(!(ternary && zero_point), "zero-point activations take int8 weights");
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "x must be float32 [M, K]");
  TORCH_CHECK(ternary || (weight.scalar_type() == torch::kInt8 && weight.dim() == 2 && weight.size(0) == N &&
                          weight.size(1) == x.size(1) && code_sums.has_value()),
              "weight must be int8 codes [N, K] with their row sums, or packed ternary uint8");
  row_scale = row_scale.contiguous();
  TORCH_CHECK(row_scale.dtype() == torch::kFloat32 && (row_scale.numel() == N || row_scale.numel() == 1),
              "row_scale must be float32 [N] or [1]");
  auto xz = x.contiguous().clone();
  const int64_t M = xz.size(0), K = xz.size(1);
  float* px = xz.data_ptr<float>();
  std::vector<int64_t> cols;
  std::vector<float> xo;  // the outlier columns of x, [M, cols]
  if (!ternary && threshold > 0) {
    const float t = static_cast<float>(threshold);
    for (int64_t k = 0; k < K; ++k) {
      bool hit = false;
      for (int64_t m = 0; m < M; ++m) hit |= std::fabs(px[m * K + k]) >= t;
      if (hit) cols.push_back(k);
    }
    xo.resize(M * cols.size());
    for (int64_t m = 0; m < M; ++m)
      for (size_t j = 0; j < cols.size(); ++j) xo[m * cols.size() + j] = px[m * K + cols[j]], px[m * K + cols[j]] = 0.f;
  }
  torch::Tensor codes, stats;
  std::vector<float> zscale;  // zero point: the rows' scales and shifts, in plain vectors (two tensors fewer a call)
  std::vector<int32_t> zshift;
  if (zero_point) {
    codes = torch::empty({M, K}, torch::kInt8), stats = torch::empty({M}, torch::kFloat32);
    zscale.resize(M), zshift.resize(M);
    for (int64_t m = 0; m < M; ++m)
      zeropoint_row(px + m * K, K, codes.data_ptr<int8_t>() + m * K, zscale[m], zshift[m], stats.data_ptr<float>()[m]);
  } else {
    auto q = quantize_rowwise_int8(xz);
    codes = q[0], stats = q[1];
  }
  const float* absmax = stats.data_ptr<float>();
  bool finite = true;
  for (int64_t m = 0; m < M; ++m) finite &= std::isfinite(absmax[m]);
  auto acc = ternary ? ternary_gemv(codes, weight, N) : int8_int8_gemv(codes, weight, *code_sums);
  const int32_t* shift = zero_point ? zshift.data() : nullptr;
  const torch::Tensor sums_t = zero_point ? code_sums->contiguous() : torch::Tensor();
  const int32_t* sums = zero_point ? sums_t.data_ptr<int32_t>() : nullptr;
  const int32_t* pa = acc.data_ptr<int32_t>();
  const float* rs = row_scale.data_ptr<float>();
  const int64_t rstride = row_scale.numel() == 1 ? 0 : 1, C = static_cast<int64_t>(cols.size());
  const int8_t* pw = ternary ? nullptr : weight.data_ptr<int8_t>();
  auto y = torch::empty({M, N}, torch::kFloat32);
  float* py = y.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const float xs = zero_point ? zscale[m] : absmax[m] / 127.0f;
    for (int64_t n = 0; n < N; ++n) {
      const float r = rs[n * rstride];
      const int32_t a = pa[m * N + n] + (shift ? shift[m] * sums[n] : 0);
      float v = static_cast<float>(a) * xs * r;
      if (C) {
        float o = 0.f;
        for (int64_t j = 0; j < C; ++j) o += xo[m * C + j] * (static_cast<float>(pw[n * K + cols[j]]) * r);
        v += o;
      }
      py[m * N + n] = v;
    }
  }
  return {y, stats, finite};
}

#if defined(__AVX512VNNI__) && defined(LOWBIT_AVX512)
namespace {
// Rows [n0, n1) of the ternary product for MB rows of x in lane order: 64 bytes hold 256 weights, shift 2s of
// byte p is weight 4p + 3 - s.
// store(m, n, acc) takes each exact int32 sum.
template <int MB, typename Store>
void ternary_rows(const uint8_t* pw, int64_t row_bytes, const int8_t* xp, int64_t Kp, const int32_t* xsum,
                  int64_t n0, int64_t n1, Store&& store) {
  const int64_t full = row_bytes / 64, tail = row_bytes % 64;
  const __m512i three = _mm512_set1_epi8(3);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = pw + n * row_bytes;
    __m512i a[4][MB];  // one chain per shift (exact integer sums)
    for (int s = 0; s < 4; ++s)
      for (int m = 0; m < MB; ++m) a[s][m] = _mm512_setzero_si512();
    for (int64_t c = 0; c < Kp / 256; ++c) {
      prefetch_ahead(row + c * 64);
      const __m512i v = c < full ? _mm512_loadu_si512(row + c * 64)
                                 : _mm512_maskz_loadu_epi8((__mmask64)((1ULL << tail) - 1), row + c * 64);
#pragma GCC unroll 4
      for (int s = 0; s < 4; ++s) {
        const __m512i codes = _mm512_and_si512(_mm512_srli_epi32(v, 2 * s), three);
        for (int m = 0; m < MB; ++m)
          a[s][m] = _mm512_dpbusd_epi32(a[s][m], codes, _mm512_loadu_si512(xp + m * Kp + c * 256 + s * 64));
      }
    }
    for (int m = 0; m < MB; ++m) {
      const __m512i t = _mm512_add_epi32(_mm512_add_epi32(a[0][m], a[1][m]), _mm512_add_epi32(a[2][m], a[3][m]));
      store(m, n, _mm512_reduce_add_epi32(t) - xsum[m]);
    }
  }
}
}  // namespace
#endif

namespace {
#if defined(__AVX512VNNI__) && defined(LOWBIT_AVX512)
// One row of int8 x [K] in the ternary kernel's lane order into out [Kp]: 64 bytes hold 256 weights, shift 2s of
// byte p is weight 4p + 3 - s; zeros past K.
void ternary_lane_order(const int8_t* x, int64_t K, int64_t Kp, int8_t* out) {
  for (int64_t c = 0; c < Kp; c += 256)
    for (int64_t s = 0; s < 4; ++s)
      for (int64_t p = 0; p < 64; ++p) {
        const int64_t k = c + 4 * p + 3 - s;
        out[c + s * 64 + p] = k < K ? x[k] : 0;
      }
}
#endif

// The exact int32 x . T[n] of one row of x in natural order (builds without VNNI).
inline int32_t ternary_dot_scalar(const uint8_t* row, const int8_t* x, int64_t K) {
  int32_t a = 0;
  for (int64_t k = 0; k < K; ++k) a += static_cast<int32_t>((row[k / 4] >> (6 - 2 * (k % 4))) & 3) * x[k];
  return a;
}
}  // namespace

// acc[M, N] = xq[M, K] @ T^T exactly in int32 for ternary T packed 2 bits a weight (codes 0, 1, 2 = -1, 0, 1; first
// in the high bits), as sum(code * x) - sum(x). Rows of T start on a byte: K % 4 == 0.
torch::Tensor ternary_gemv(torch::Tensor xq, torch::Tensor packed, int64_t N) {
  TORCH_CHECK(xq.dtype() == torch::kInt8 && xq.dim() == 2, "xq must be int8 [M, K]");
  const int64_t M = xq.size(0), K = xq.size(1), row_bytes = K / 4;
  TORCH_CHECK(K % 4 == 0, "ternary rows must hold a multiple of 4 weights");
  TORCH_CHECK(packed.dtype() == torch::kUInt8 && packed.is_contiguous() && packed.numel() >= N * row_bytes,
              "packed must be contiguous uint8 of N rows");
  xq = xq.contiguous();
  const int8_t* px = xq.data_ptr<int8_t>();
  const uint8_t* pw = packed.data_ptr<uint8_t>();
  auto acc = torch::empty({M, N}, torch::kInt32);
  int32_t* pa = acc.data_ptr<int32_t>();
  std::vector<int32_t> xsum(M, 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xsum[m] += px[m * K + k];
#if defined(__AVX512VNNI__) && defined(LOWBIT_AVX512)
  const int64_t Kp = (K + 255) / 256 * 256;
  std::vector<int8_t> xp(M * Kp, 0);
  for (int64_t m = 0; m < M; ++m) ternary_lane_order(px + m * K, K, Kp, xp.data() + m * Kp);
#endif
  at::parallel_for(0, N, std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1)), [&](int64_t n0, int64_t n1) {
#if defined(__AVX512VNNI__) && defined(LOWBIT_AVX512)
    for_x_blocks(M, [&](int64_t m0, auto mb) {
      ternary_rows<decltype(mb)::value>(pw, row_bytes, xp.data() + m0 * Kp, Kp, xsum.data() + m0, n0, n1,
                                        [&](int m, int64_t n, int32_t a) { pa[(m0 + m) * N + n] = a; });
    });
#else
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m = 0; m < M; ++m) pa[m * N + n] = ternary_dot_scalar(pw + n * row_bytes, px + m * K, K) - xsum[m];
#endif
  });
  return acc;
}

void ternary_prepare_row(const float* x, int64_t K, bool norm, LutRowInput& in) {
  if (in.bits == kTernaryInput && in.K == K && in.tnorm == norm) return;
  const float* src = x;
  if (norm) {  // as torch's rms_norm: x * rsqrt(mean(x^2) + eps)
    in.tn.resize(K);
    float ss = 0.f;
    for (int64_t k = 0; k < K; ++k) ss += x[k] * x[k];
    const float r = 1.f / std::sqrt(ss / static_cast<float>(K) + 1e-6f);
    for (int64_t k = 0; k < K; ++k) in.tn[k] = x[k] * r;
    src = in.tn.data();
  }
#if defined(__AVX512VNNI__) && defined(LOWBIT_AVX512)
  std::vector<int8_t>& codes = in.tcodes;  // a scratch kept with the input: no allocation per token
#else
  std::vector<int8_t>& codes = in.tq;  // the scalar kernel reads column order
#endif
  codes.resize(K);
  in.tabsmax = quantize_row_int8(src, K, codes.data());
  in.tsum = 0;
  for (int64_t k = 0; k < K; ++k) in.tsum += codes[k];
#if defined(__AVX512VNNI__) && defined(LOWBIT_AVX512)
  const int64_t Kp = (K + 255) / 256 * 256;
  in.tq.resize(Kp);
  ternary_lane_order(codes.data(), K, Kp, in.tq.data());
#endif
  in.bits = kTernaryInput, in.K = K, in.tnorm = norm;
}

void ternary_rows_range(const uint8_t* packed, float gamma, const LutRowInput& in, float* y, int64_t K, int64_t n0,
                        int64_t n1) {
  const int64_t row_bytes = K / 4;
  if (!std::isfinite(in.tabsmax)) {  // the codes are zeros: say so rather than return a finite wrong answer
    std::fill(y + n0, y + n1, std::numeric_limits<float>::quiet_NaN());
    return;
  }
  // BitLinear's order: acc * (absmax / 127) * gamma
#if defined(__AVX512VNNI__) && defined(LOWBIT_AVX512)
  ternary_rows<1>(packed, row_bytes, in.tq.data(), static_cast<int64_t>(in.tq.size()), &in.tsum, n0, n1,
                  [&](int, int64_t n, int32_t a) { y[n] = static_cast<float>(a) * (in.tabsmax / 127.0f) * gamma; });
#else
  for (int64_t n = n0; n < n1; ++n)
    y[n] = static_cast<float>(ternary_dot_scalar(packed + n * row_bytes, in.tq.data(), K) - in.tsum) *
           (in.tabsmax / 127.0f) * gamma;
#endif
}

// Rows [r0, r1) of a ternary weight packed 2 bits a weight (K % 4 == 0), as int8 -1/0/1 into out [r1 - r0, K].
void ternary_unpack_rows(torch::Tensor packed, int64_t K, int64_t r0, int64_t r1, torch::Tensor out) {
  TORCH_CHECK(K % 4 == 0 && packed.dtype() == torch::kUInt8 && packed.is_contiguous() && packed.numel() >= r1 * K / 4,
              "packed must hold r1 rows of K / 4 bytes");
  TORCH_CHECK(out.dtype() == torch::kInt8 && out.is_contiguous() && out.numel() >= (r1 - r0) * K, "out too small");
  const uint8_t* pw = packed.data_ptr<uint8_t>() + r0 * K / 4;
  int8_t* po = out.data_ptr<int8_t>();
  at::parallel_for(0, (r1 - r0) * K / 4, 4096, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t v = pw[b];
      po[4 * b] = static_cast<int8_t>((v >> 6) & 3) - 1;
      po[4 * b + 1] = static_cast<int8_t>((v >> 4) & 3) - 1;
      po[4 * b + 2] = static_cast<int8_t>((v >> 2) & 3) - 1;
      po[4 * b + 3] = static_cast<int8_t>(v & 3) - 1;
    }
  });
}

// Sum of a large tensor's bytes read with wide loads on every thread: a memory-read bandwidth probe.
int64_t read_probe(torch::Tensor t) {
  TORCH_CHECK(t.is_contiguous(), "t must be contiguous");
  const uint8_t* p = static_cast<const uint8_t*>(t.data_ptr());
  const int64_t n = t.numel() * t.element_size() / 64;
  std::atomic<int64_t> total{0};
  at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
#ifdef LOWBIT_AVX512
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = i0;
    for (; i + 4 <= i1; i += 4) {
      a0 = _mm512_add_epi32(a0, _mm512_loadu_si512(p + 64 * i));
      a1 = _mm512_add_epi32(a1, _mm512_loadu_si512(p + 64 * i + 64));
      a2 = _mm512_add_epi32(a2, _mm512_loadu_si512(p + 64 * i + 128));
      a3 = _mm512_add_epi32(a3, _mm512_loadu_si512(p + 64 * i + 192));
    }
    for (; i < i1; ++i) a0 = _mm512_add_epi32(a0, _mm512_loadu_si512(p + 64 * i));
    total += _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)));
#else
    int64_t acc = 0;
    for (int64_t i = 64 * i0; i < 64 * i1; ++i) acc += p[i];
    total += acc;
#endif
  });
  return total.load();
}

// The instruction set this build was compiled for (lowbit/kernels/cpu_ext.py checks it against the variant).
std::string compiled_isa() {
#if defined(LOWBIT_AVX512) && defined(__AVX512VNNI__) && defined(__AVX512BF16__)
  return "avx512_bf16";
#elif defined(LOWBIT_AVX512) && defined(__AVX512VNNI__)
  return "avx512_vnni";
#elif defined(LOWBIT_AVX512)
  return "avx512";
#else
  return "scalar";
#endif
}

// One-row products over a range of rows (rows.h), for a caller's own thread team.
std::pair<int64_t, int64_t> lut_shape(const LutPlan& plan) {
  const auto& f = *static_cast<const LutFormat*>(plan.format.get());
  return {f.N, f.K};
}

bool lut_takes_int8_x(const LutPlan& plan) {
#if defined(LOWBIT_AVX512) && defined(__AVX512VNNI__)
  const auto& f = *static_cast<const LutFormat*>(plan.format.get());
  return f.bits == 4 && !f.has_outliers() && f.stat_group == 0 && !plan.bf16_dot;
#else
  (void)plan;
  return false;
#endif
}

bool lut_input_matches(const LutPlan& plan, const LutRowInput& in) {
  const auto& f = *static_cast<const LutFormat*>(plan.format.get());
  const bool q8 = in.want_int8_x && lut_takes_int8_x(plan);
  return in.bits == f.bits && in.K == f.K && in.bf16 == plan.bf16_dot && in.int8_x == q8;
}

// x's int8 blocks: one lane of the kernel (8 weights), the finest its per-lane scales allow, at no cost in the
// kernel (it reads a scale per lane either way). NF4 SmolLM2's perplexity on python-tutorial through the decode
// step (benchmarks/bench_fast_paths.py): llama.cpp's blocks of 32 with one table +1.33%, blocks of 8 +0.77%, blocks
// of 8 with the two tables above +0.02%.
constexpr int64_t kXBlock = 8;

void quantize_x_q8(const float* x, int64_t K, int64_t Kp, LutRowInput& in) {
  // int8 codes round(x / d), d = max|x| / 127 per block of kXBlock (0 where the block is 0), in the kernel's order:
  // chunk c's 64 even weights' codes, then its 64 odd ones'; per lane (8 weights): 128 * the codes' sum, d, and the
  // float32 sum of x.
  in.xq.assign(Kp, 0);
  in.xs128.assign(Kp / 8, 0);
  in.dx.assign(Kp / 8, 0.f);
  in.ls.assign(Kp / 8, 0.f);
  std::vector<int8_t> q(Kp, 0);
  for (int64_t b0 = 0; b0 < Kp; b0 += kXBlock) {
    float most = 0.f;
    for (int64_t k = b0; k < std::min(K, b0 + kXBlock); ++k) most = std::max(most, std::fabs(x[k]));
    const float d = most / 127.f;
    for (int64_t k = b0; k < std::min(K, b0 + kXBlock); ++k)
      q[k] = d > 0.f ? static_cast<int8_t>(std::nearbyint(x[k] / d)) : 0;
    for (int64_t l = b0 / 8; l < (b0 + kXBlock) / 8; ++l) in.dx[l] = d;
  }
  for (int64_t k = 0; k < Kp; ++k) {
    const int64_t c = k / 128, r = k % 128;
    in.xq[c * 128 + (r % 2) * 64 + r / 2] = q[k];
    in.xs128[k / 8] += 128 * q[k];
  }
  for (int64_t k = 0; k < K; ++k) in.ls[k / 8] += x[k];
}

void lut_prepare_row(const LutPlan& plan, const float* x, LutRowInput& in) {
  const auto& f = *static_cast<const LutFormat*>(plan.format.get());
  in.bits = f.bits, in.K = f.K, in.bf16 = plan.bf16_dot;
  in.s.resize(f.groups + 32), in.nz.resize(f.groups + 32);
  in.int8_x = in.want_int8_x && lut_takes_int8_x(plan);
  if (in.int8_x) {
    quantize_x_q8(x, f.K, f.padded_k(), in);
    return;
  }
#ifdef LOWBIT_AVX512
  const int64_t Kp = f.padded_k();
  in.ls.resize(Kp / f.lane_elems());
#ifdef __AVX512BF16__
  if (plan.bf16_dot) {
    in.xb.resize(Kp);
    permute_x_bf16(f, x, 1, in.xb.data(), in.ls.data());
    return;
  }
#endif
  in.xp.resize(Kp);
  permute_x(f, x, 1, in.xp.data(), in.ls.data());
#endif
}

void lut_rows_range(const LutPlan& plan, LutRowInput& in, const float* x, float* y, int64_t n0, int64_t n1) {
  const auto& f = *static_cast<const LutFormat*>(plan.format.get());
  // The row constants' scratch: an input prepared for another plan of this lane order may have fewer groups.
  if (static_cast<int64_t>(in.s.size()) < f.groups + 32) in.s.resize(f.groups + 32), in.nz.resize(f.groups + 32);
#if defined(LOWBIT_AVX512) && defined(__AVX512VNNI__)
  if (in.int8_x) {
    lut_rows_q8(f, in.xq.data(), in.xs128.data(), in.dx.data(), in.ls.data(), y, n0, n1, in.s.data(), in.nz.data());
    return;
  }
#endif
#ifdef LOWBIT_AVX512
  const int64_t Kp = f.padded_k();
  float* s = in.s.data();
  float* nz = in.nz.data();
#ifdef __AVX512BF16__
  if (plan.bf16_dot) {
    if (f.bits == 4) lut_rows<1, 4>(f, in.xb.data(), in.ls.data(), Kp, x, y, f.N, n0, n1, s, nz);
    else lut_rows<1, 2>(f, in.xb.data(), in.ls.data(), Kp, x, y, f.N, n0, n1, s, nz);
    return;
  }
#endif
  if (f.bits == 4) lut_rows<1, 4>(f, in.xp.data(), in.ls.data(), Kp, x, y, f.N, n0, n1, s, nz);
  else if (f.bits == 3) lut_rows<1, 3>(f, in.xp.data(), in.ls.data(), Kp, x, y, f.N, n0, n1, s, nz);
  else lut_rows<1, 2>(f, in.xp.data(), in.ls.data(), Kp, x, y, f.N, n0, n1, s, nz);
#else
  lut_rows_scalar(f, x, 1, y, f.N, n0, n1, in.s.data(), in.nz.data());
#endif
}

void float_rows_range(const float* x, const float* w, float* y, int64_t K, int64_t n0, int64_t n1) {
  float_rows<1>(x, w, y, K, 0, n0, n1);  // N is the stride between rows of y: one row here
}

void int8_rows_range(const float* x, const int8_t* codes, const float* row_scale, float* y, int64_t K, int64_t n0,
                     int64_t n1) {
  int8_rows<1>(x, codes, row_scale, y, K, 0, n0, n1);
}

// y [M, N] = x [M, K] @ W^T on the int8-activation kernel (lut_takes_int8_x(plan)), each row of x quantized as
// the native decode step quantizes it: the kernel's arithmetic, callable alone (tests, benchmarks).
torch::Tensor lut_gemv_int8x(const LutPlan& plan, torch::Tensor x) {
  TORCH_CHECK(lut_takes_int8_x(plan), "this plan or build has no int8-activation kernel");
  const auto& f = *static_cast<const LutFormat*>(plan.format.get());
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.size(1) == f.K, "x must be float32 [M, K]");
  x = x.contiguous();
  const int64_t M = x.size(0);
  auto y = torch::empty({M, f.N}, torch::kFloat32);
  for (int64_t m = 0; m < M; ++m) {
    LutRowInput prepared;
    prepared.want_int8_x = true;
    lut_prepare_row(plan, x.data_ptr<float>() + m * f.K, prepared);
    at::parallel_for(0, f.N, 64, [&](int64_t n0, int64_t n1) {
      LutRowInput in = prepared;  // the row constants' scratch is per thread
      lut_rows_range(plan, in, nullptr, y.data_ptr<float>() + m * f.N, n0, n1);
    });
  }
  return y;
}
