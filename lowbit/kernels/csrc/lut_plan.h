// A LUT-quantized weight bound once for repeated GEMVs (matmul.cpp), shared with the Python bindings.
#pragma once
#include <torch/types.h>

#include <memory>
#include <vector>

struct LutPlan {
  LutPlan(bool bf16_dot, torch::Tensor packed, int64_t N, int64_t K, int64_t bits, torch::Tensor lut, int64_t block,
          torch::Tensor scale, c10::optional<torch::Tensor> zero, c10::optional<torch::Tensor> nested_absmax,
          c10::optional<torch::Tensor> nested_table, double offset, int64_t nested_block,
          c10::optional<torch::Tensor> stat_scale, c10::optional<torch::Tensor> stat_zero, int64_t stat_group,
          c10::optional<torch::Tensor> rowptr, c10::optional<torch::Tensor> cols, c10::optional<torch::Tensor> values);
  // y [M, N] = x [M, K] @ W^T (float32 x, a few rows)
  torch::Tensor gemv(torch::Tensor x) const;

  std::shared_ptr<const void> format;  // matmul.cpp's LutFormat, which holds the buffers it reads
  torch::Tensor packed;                // the codes (the format keeps only their pointer)
  bool bf16_dot;
};

// [x @ W_i^T for each plan] in one parallel region (the weights share K).
std::vector<torch::Tensor> lut_gemv_many(const std::vector<std::shared_ptr<LutPlan>>& plans, torch::Tensor x);
