// A LUT-quantized weight bound once for repeated GEMVs (matmul.cpp), shared with the Python bindings.
#pragma once
#include <torch/types.h>

#include <memory>
#include <vector>

struct LutPlan {
  // One typed builder per layout family (lowbit/kernels/layouts.py), each checking what it is given:
  // scales float32/float16 [N, groups] and zeros float32/uint8 or none;
  static std::shared_ptr<LutPlan> plain(bool bf16_dot, torch::Tensor packed, int64_t N, int64_t K, int64_t bits,
                                        torch::Tensor lut, int64_t block, torch::Tensor scale,
                                        c10::optional<torch::Tensor> zero);
  // double quantization: absmax codes [N * groups] decoded by nested_table, nested_absmax and offset;
  static std::shared_ptr<LutPlan> double_quant(bool bf16_dot, torch::Tensor packed, int64_t N, int64_t K,
                                               torch::Tensor lut, int64_t block, torch::Tensor codes,
                                               torch::Tensor nested_absmax, torch::Tensor nested_table, double offset,
                                               int64_t nested_block);
  // SpQR: 3-bit codes of scales and zeros with float16 statistics per stat_group rows, CSR outliers.
  static std::shared_ptr<LutPlan> spqr(bool bf16_dot, torch::Tensor packed, int64_t N, int64_t K, int64_t bits,
                                       torch::Tensor lut, int64_t block, torch::Tensor stat_codes,
                                       torch::Tensor stat_scale, torch::Tensor stat_zero, int64_t stat_group,
                                       c10::optional<torch::Tensor> rowptr, c10::optional<torch::Tensor> cols,
                                       c10::optional<torch::Tensor> values);
  // y [M, N] = x [M, K] @ W^T (float32 x, a few rows)
  torch::Tensor gemv(torch::Tensor x) const;
  // rows [r0, r1) of W dequantized in the kernels' lane order into out [r1 - r0, padded K] (float32 or bfloat16)
  void dequant_rows(int64_t r0, int64_t r1, torch::Tensor out) const;

  std::shared_ptr<const void> format;  // matmul.cpp's LutFormat, which holds the buffers it reads
  torch::Tensor packed;                // the codes (the format keeps only their pointer)
  bool bf16_dot = false;
};

// [x @ W_i^T for each plan] in one parallel region (the weights share K).
std::vector<torch::Tensor> lut_gemv_many(const std::vector<std::shared_ptr<LutPlan>>& plans, torch::Tensor x);
