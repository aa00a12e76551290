// The text tower's BERT encoder on int8 linear layers (int8_bert.cpp); inputs checked by int8_ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>  // not ATen/ATen.h: each source includes the ATen/ops it calls (build time)

#include <vector>

#include "int8_linear.h"

namespace laclip {

struct BertLayerWeights {
  PackedLinear qkv, out, ffn1, ffn2;  // query/key/value packed as one [3H, H] layer
  const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
};

struct BertWeights {
  const float* word;       // [vocab, H]
  const float* position;   // [positions, H], token type 0's embedding already added
  const float *ln_w, *ln_b;
  int64_t vocab, positions, hidden, heads;
  double eps;
  std::vector<BertLayerWeights> layers;
};

// ids [B, L] contiguous int64 -> [B, H] float32: the last layer's hidden state of each sequence's first token
// (cn_clip BERT: post-LayerNorm layers, erf GELU, additive -10000 on pad keys).
at::Tensor bert_int8_first_token(const at::Tensor& ids, const BertWeights& w, int64_t pad_id);

}  // namespace laclip
