// The int8 operators, registered with the PyTorch dispatcher beside the LACLIP ones (CPU kernels; the fake
// kernels for torch.compile are in engine/int8_text.py):
//   int8_pack_linear(Tensor weight) -> (Tensor packed, Tensor scale, Tensor colsum)
//   int8_linear(Tensor x, Tensor packed, Tensor scale, Tensor colsum, Tensor? bias) -> Tensor
//   int8_bert_encode(Tensor input_ids, Tensor[] weights, int heads, float eps, int pad_id) -> Tensor
// This file is the only place their inputs are checked: a bad input raises c10::ValueError (Python ValueError)
// naming it, before any kernel runs.
#include <torch/library.h>

#include <string>

#include "int8_bert.h"
#include "int8_linear.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/isfinite.h>

namespace laclip {
namespace {

constexpr int64_t kMaxFeatures = 32768;  // keeps every int32 sum of the GEMM in range (int8_linear.cpp)
constexpr int64_t kTensorsPerLayer = 20;
constexpr int64_t kEmbeddingTensors = 4;

void check_cpu(const at::Tensor& x, const std::string& what, at::ScalarType dtype, int64_t dim) {
  TORCH_CHECK_VALUE(x.defined(), "int8: ", what, " is an undefined tensor");
  TORCH_CHECK_VALUE(x.device().is_cpu(), "int8: ", what, " must be on the CPU, got ", x.device());
  TORCH_CHECK_VALUE(x.scalar_type() == dtype, "int8: ", what, " must be ", dtype, ", got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == dim, "int8: ", what, " must be ", dim, "-D, got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.is_contiguous(), "int8: ", what, " must be contiguous");
}

void check_vector(const at::Tensor& x, const std::string& what, at::ScalarType dtype, int64_t n) {
  check_cpu(x, what, dtype, 1);
  TORCH_CHECK_VALUE(x.size(0) == n, "int8: ", what, " must have ", n, " values, got ", x.size(0));
}

const float* vector_of(const at::Tensor& x, const std::string& what, int64_t n) {
  check_vector(x, what, at::kFloat, n);
  return x.data_ptr<float>();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pack_entry(const at::Tensor& weight) {
  TORCH_CHECK_VALUE(weight.defined(), "int8: weight is an undefined tensor");
  TORCH_CHECK_VALUE(weight.device().is_cpu() && weight.dim() == 2 && weight.is_floating_point(),
                    "int8: weight must be a 2-D floating-point CPU tensor [N, K], got ", weight.scalar_type(),
                    " on ", weight.device(), " with shape ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) > 0 && weight.size(1) > 0 && weight.size(1) <= kMaxFeatures,
                    "int8: weight [N, K] needs N >= 1 and 1 <= K <= ", kMaxFeatures, ", got ", weight.sizes());
  TORCH_CHECK_VALUE(at::isfinite(weight).all().item<bool>(), "int8: weight has NaN or infinite values");
  return int8_pack_weight(weight);
}

at::Tensor linear_entry(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                        const at::Tensor& colsum, const c10::optional<at::Tensor>& bias) {
  check_cpu(x, "input x", at::kFloat, 2);
  const PackedLinear layer = check_packed_linear(packed, scale, colsum, bias, x.size(1), "layer");
  at::Tensor out = at::empty({x.size(0), layer.n}, at::kFloat);
  if (x.size(0) > 0) int8_linear_into(x.data_ptr<float>(), x.size(0), layer, out.data_ptr<float>());
  return out;
}

PackedLinear layer_at(at::TensorList w, int64_t at, int64_t k, int64_t n, const std::string& what) {
  const PackedLinear layer = check_packed_linear(w[at], w[at + 1], w[at + 2], w[at + 3], k, what);
  TORCH_CHECK_VALUE(layer.n == n, "int8: ", what, " has ", layer.n, " outputs, expected ", n);
  return layer;
}

BertWeights bert_weights(at::TensorList w, int64_t heads, double eps) {
  const int64_t count = static_cast<int64_t>(w.size());
  TORCH_CHECK_VALUE(count > kEmbeddingTensors && (count - kEmbeddingTensors) % kTensorsPerLayer == 0,
                    "int8: weights must hold ", kEmbeddingTensors, " embedding tensors and ", kTensorsPerLayer,
                    " per layer (engine.int8_text.pack_bert), got ", count);
  check_cpu(w[0], "word embeddings", at::kFloat, 2);
  check_cpu(w[1], "position embeddings", at::kFloat, 2);
  BertWeights out;
  out.word = w[0].data_ptr<float>();
  out.vocab = w[0].size(0);
  out.hidden = w[0].size(1);
  const int64_t hidden = out.hidden;
  TORCH_CHECK_VALUE(w[1].size(1) == hidden, "int8: position embeddings have width ", w[1].size(1),
                    " but word embeddings ", hidden);
  TORCH_CHECK_VALUE(heads >= 1 && hidden % heads == 0, "int8: heads must divide the width ", hidden, ", got ",
                    heads);
  TORCH_CHECK_VALUE(eps > 0.0, "int8: LayerNorm eps must be > 0, got ", eps);
  out.position = w[1].data_ptr<float>();
  out.positions = w[1].size(0);
  out.ln_w = vector_of(w[2], "embedding LayerNorm weight", hidden);
  out.ln_b = vector_of(w[3], "embedding LayerNorm bias", hidden);
  out.heads = heads;
  out.eps = eps;
  for (int64_t at = kEmbeddingTensors, i = 0; at < count; at += kTensorsPerLayer, ++i) {
    const std::string name = "layer " + std::to_string(i);
    BertLayerWeights layer;
    layer.qkv = layer_at(w, at, hidden, 3 * hidden, name + " query/key/value");
    layer.out = layer_at(w, at + 4, hidden, hidden, name + " attention output");
    layer.ln1_w = vector_of(w[at + 8], name + " attention LayerNorm weight", hidden);
    layer.ln1_b = vector_of(w[at + 9], name + " attention LayerNorm bias", hidden);
    layer.ffn1 = check_packed_linear(w[at + 10], w[at + 11], w[at + 12], w[at + 13], hidden, name + " intermediate");
    layer.ffn2 = layer_at(w, at + 14, layer.ffn1.n, hidden, name + " output");
    layer.ln2_w = vector_of(w[at + 18], name + " output LayerNorm weight", hidden);
    layer.ln2_b = vector_of(w[at + 19], name + " output LayerNorm bias", hidden);
    out.layers.push_back(layer);
  }
  return out;
}

at::Tensor bert_entry(const at::Tensor& ids, at::TensorList weights, int64_t heads, double eps, int64_t pad_id) {
  check_cpu(ids, "input_ids", at::kLong, 2);
  const BertWeights w = bert_weights(weights, heads, eps);
  TORCH_CHECK_VALUE(ids.size(0) >= 1 && ids.size(1) >= 1, "int8: input_ids [B, L] needs B, L >= 1, got ",
                    ids.sizes());
  TORCH_CHECK_VALUE(ids.size(1) <= w.positions, "int8: input_ids has ", ids.size(1), " tokens but the model has ",
                    w.positions, " positions");
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < ids.numel(); ++i)
    TORCH_CHECK_VALUE(id[i] >= 0 && id[i] < w.vocab, "int8: token id ", id[i], " at [", i / ids.size(1), ", ",
                      i % ids.size(1), "] is outside the vocabulary [0, ", w.vocab, ")");
  return bert_int8_first_token(ids, w, pad_id);
}

}  // namespace

PackedLinear check_packed_linear(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& colsum,
                                 const c10::optional<at::Tensor>& bias, int64_t k, const std::string& what) {
  check_cpu(packed, what + " packed weight", at::kChar, 4);
  check_cpu(scale, what + " scale", at::kFloat, 1);
  const int64_t n = scale.size(0);
  TORCH_CHECK_VALUE(k >= 1 && k <= kMaxFeatures, "int8: ", what, " input has ", k, " features; 1..",
                    kMaxFeatures, " are supported");
  const std::vector<int64_t> expected{(n + kInt8Cols - 1) / kInt8Cols, (k + kInt8Group - 1) / kInt8Group,
                                      kInt8Cols, kInt8Group};
  TORCH_CHECK_VALUE(packed.sizes() == at::IntArrayRef(expected), "int8: ", what, " packed weight has shape ",
                    packed.sizes(), " but ", n, " outputs of ", k, " inputs pack to ", at::IntArrayRef(expected));
  check_vector(colsum, what + " colsum", at::kInt, n);
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) b = vector_of(*bias, what + " bias", n);
  return PackedLinear{packed.data_ptr<int8_t>(), scale.data_ptr<float>(), colsum.data_ptr<int32_t>(), b, n, k};
}

}  // namespace laclip

TORCH_LIBRARY_FRAGMENT(cnclip, m) {
  m.set_python_module("engine.int8_text");
  m.def("int8_pack_linear(Tensor weight) -> (Tensor, Tensor, Tensor)");
  m.def("int8_linear(Tensor x, Tensor packed, Tensor scale, Tensor colsum, Tensor? bias) -> Tensor");
  m.def("int8_bert_encode(Tensor input_ids, Tensor[] weights, int heads, float eps, int pad_id) -> Tensor");
}

TORCH_LIBRARY_IMPL(cnclip, CPU, m) {
  m.impl("int8_pack_linear", &laclip::pack_entry);
  m.impl("int8_linear", &laclip::linear_entry);
  m.impl("int8_bert_encode", &laclip::bert_entry);
}
