// One row of x times a range of a weight's rows, for callers that run their own thread team (engine.cpp): the
// same kernels as the GEMVs of matmul.cpp, without their parallel region. Each call writes y[n0:n1) only.
#pragma once
#include <torch/types.h>

#include "lut_plan.h"

#include <cstdint>
#include <utility>
#include <vector>

// x [K] made ready for a LUT plan's kernel: x in the plan's lane order (float32, or bf16 for the bf16-dot kernel),
// its lane sums, and the row-constant scratch. One per thread; prepare once per x and reuse for each plan whose
// lane order (bits, bf16_dot, K) is the same.
// want_int8_x: x quantized to int8 per block of 8 for the plans that take it (lut_takes_int8_x), the integer
// kernel's input: int8 codes, 128 * their sum and the scale per lane of 8 weights.
struct LutRowInput {
  std::vector<float> xp, ls, s, nz, dx;
  std::vector<uint16_t> xb;
  std::vector<int8_t> xq;
  std::vector<int32_t> xs128;
  // For ternary weights (ternary_prepare_row): x (RMS-normed if asked) as int8 codes, in the ternary kernel's lane
  // order, their sum and x's absmax; bits == kTernaryInput marks them ready.
  std::vector<float> tn;
  std::vector<int8_t> tq, tcodes;  // tcodes: the codes in column order, before the lane order (reused scratch)
  int32_t tsum = 0;
  float tabsmax = 0.f;
  bool tnorm = false;
  int64_t bits = -1, K = -1;
  bool bf16 = false, int8_x = false, want_int8_x = false;
};

// [N, K] of the plan's weight.
std::pair<int64_t, int64_t> lut_shape(const LutPlan& plan);
// Whether this build has an int8-activation kernel for `plan` (4-bit codes without SpQR's parts, float32 compute,
// a VNNI build).
bool lut_takes_int8_x(const LutPlan& plan);
// Whether `in` already holds x for `plan`'s lane order.
bool lut_input_matches(const LutPlan& plan, const LutRowInput& in);
void lut_prepare_row(const LutPlan& plan, const float* x, LutRowInput& in);
// y[n] = x . W[n] for n in [n0, n1), x as prepared (and as given: SpQR's outliers read it in column order).
void lut_rows_range(const LutPlan& plan, LutRowInput& in, const float* x, float* y, int64_t n0, int64_t n1);
// One row of per-token absmax int8 (lowbit.functional.quantize_absmax, quant.cpp): codes into o, returns the absmax
// (codes 0 where it is not finite).
float quantize_row_int8(const float* p, int64_t cols, int8_t* o);
// `in.bits` of an input prepared for ternary weights.
constexpr int64_t kTernaryInput = -2;
// x [K] ready for ternary_rows_range: RMS-normed without a gain first when `norm` (eps 1e-6, trained b1.58 layers'
// input), then per-token absmax int8, as lowbit.nn.BitLinear computes it. Skipped where `in` holds it already.
void ternary_prepare_row(const float* x, int64_t K, bool norm, LutRowInput& in);
// y[n] = (Q8(x) . T[n]) * absmax / 127 * gamma for n in [n0, n1), T ternary packed 2 bits a weight (K % 4 == 0),
// x as prepared; NaN rows where x's absmax is not finite.
void ternary_rows_range(const uint8_t* packed, float gamma, const LutRowInput& in, float* y, int64_t K, int64_t n0,
                        int64_t n1);
void float_rows_range(const float* x, const float* w, float* y, int64_t K, int64_t n0, int64_t n1);
void int8_rows_range(const float* x, const int8_t* codes, const float* row_scale, float* y, int64_t K, int64_t n0,
                     int64_t n1);
// y [M, N] = x [M, K] @ W^T on the int8-activation kernel (each row of x quantized as the decode step does).
torch::Tensor lut_gemv_int8x(const LutPlan& plan, torch::Tensor x);
