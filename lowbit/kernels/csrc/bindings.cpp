// The Python module of lowbit's CPU kernels (quant.cpp: quantization, matmul.cpp: matmul).
#include <torch/types.h>
#include <torch/csrc/utils/pybind.h>  // lighter than torch/extension.h: a third less build time

#include "engine.h"
#include "lut_plan.h"

#include <string>
#include <vector>

std::vector<torch::Tensor> quantize_4bit(torch::Tensor x, int64_t blocksize, torch::Tensor midpoints, torch::Tensor order);
torch::Tensor dequantize_4bit(torch::Tensor packed, torch::Tensor absmax, torch::Tensor code, int64_t n, int64_t blocksize,
                              torch::Tensor out);
torch::Tensor quantize_blockwise(torch::Tensor x, int64_t blocksize, torch::Tensor code, torch::Tensor absmax);
torch::Tensor dequantize_blockwise(torch::Tensor q, torch::Tensor absmax, torch::Tensor code, int64_t blocksize,
                                   torch::Tensor out);
std::vector<torch::Tensor> quantize_rowwise_int8(torch::Tensor x);
std::vector<torch::Tensor> quantize_rowwise_zeropoint(torch::Tensor x);
torch::Tensor quantize_ternary_2bit(torch::Tensor x, double divisor);

torch::Tensor lut_permute_x(torch::Tensor x, int64_t bits);
torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor codes, torch::Tensor row_scale);
torch::Tensor float_gemv(torch::Tensor x, torch::Tensor w);
torch::Tensor int8_int8_gemv(torch::Tensor xq, torch::Tensor codes, torch::Tensor code_sums);
std::tuple<torch::Tensor, torch::Tensor, bool> q8_gemv(torch::Tensor x, torch::Tensor weight,
                                                       c10::optional<torch::Tensor> code_sums, torch::Tensor row_scale,
                                                       double threshold, int64_t N, bool zero_point);
torch::Tensor ternary_gemv(torch::Tensor xq, torch::Tensor packed, int64_t N);
void ternary_unpack_rows(torch::Tensor packed, int64_t K, int64_t r0, int64_t r1, torch::Tensor out);
int64_t read_probe(torch::Tensor t);
std::string compiled_isa();

#ifndef LOWBIT_SOURCE_DIGEST
#define LOWBIT_SOURCE_DIGEST "jit"  // built on first use (lowbit doctor --build), not at install
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("compiled_isa", &compiled_isa);
  m.def("source_digest", [] { return std::string(LOWBIT_SOURCE_DIGEST); });
  m.def("quantize_4bit", &quantize_4bit);
  m.def("dequantize_4bit", &dequantize_4bit);
  m.def("quantize_blockwise", &quantize_blockwise);
  m.def("dequantize_blockwise", &dequantize_blockwise);
  m.def("quantize_rowwise_int8", &quantize_rowwise_int8);
  m.def("quantize_rowwise_zeropoint", &quantize_rowwise_zeropoint);
  m.def("quantize_ternary_2bit", &quantize_ternary_2bit);
  // whether LutPlan(bf16_dot=True) runs: bf16-compute 4- and 2-bit GEMVs on vdpbf16ps (the avx512_bf16 build)
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  m.attr("bf16_dot") = true;
#else
  m.attr("bf16_dot") = false;
#endif
  // module_local: each kernel build (several may load in one process) has its own LutPlan type
  pybind11::class_<LutPlan, std::shared_ptr<LutPlan>>(m, "LutPlan", pybind11::module_local())
      .def_static("plain", &LutPlan::plain)
      .def_static("double_quant", &LutPlan::double_quant)
      .def_static("spqr", &LutPlan::spqr)
      .def("gemv", &LutPlan::gemv)
      .def("dequant_rows", &LutPlan::dequant_rows)
      .def("takes_int8_x", &lut_takes_int8_x)
      .def("gemv_int8x", &lut_gemv_int8x);
  m.def("lut_gemv_many", &lut_gemv_many);
  pybind11::class_<DecodeWeight, std::shared_ptr<DecodeWeight>>(m, "DecodeWeight", pybind11::module_local())
      .def_static("lut", &DecodeWeight::lut)
      .def_static("dense", &DecodeWeight::dense)
      .def_static("int8", &DecodeWeight::int8)
      .def_static("ternary", &DecodeWeight::ternary)
      .def_readonly("N", &DecodeWeight::N)
      .def_readonly("K", &DecodeWeight::K)
      // whether the step multiplies this weight by int8 activations when asked to
      .def_property_readonly("takes_int8_x", [](const DecodeWeight& w) {
        return w.kind == DecodeWeight::Kind::Lut && lut_takes_int8_x(*w.plan);
      });
  pybind11::class_<DecodeEngine>(m, "DecodeEngine", pybind11::module_local())
      .def(pybind11::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, double, std::string, torch::Tensor,
                          torch::Tensor, torch::Tensor, std::shared_ptr<DecodeWeight>, bool>())
      .def("add_layer", &DecodeEngine::add_layer)
      // the GIL released: the step runs its own thread team and touches no Python object
      .def("step", &DecodeEngine::step, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("lut_permute_x", &lut_permute_x);
  m.def("int8_gemv", &int8_gemv);
  m.def("float_gemv", &float_gemv);
  m.def("int8_int8_gemv", &int8_int8_gemv);
  m.def("q8_gemv", &q8_gemv);
  m.def("ternary_gemv", &ternary_gemv);
  m.def("ternary_unpack_rows", &ternary_unpack_rows);
  m.def("read_probe", &read_probe);
}
