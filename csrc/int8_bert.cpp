// cn_clip's BERT text encoder with every linear layer in int8 (int8_linear.h) and everything else in float32:
// embeddings and LayerNorm, attention (scores, softmax, weighted values), GELU. Written for short queries, where
// reading the weights is the cost: one pass over each layer's int8 weights per call, no framework op per step.
// The last layer runs its output projection and MLP for the first token only (the tower returns that token).
#include "int8_bert.h"

#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/scaled_dot_product_attention.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace laclip {
namespace {

constexpr float kMaskedScore = -10000.f;  // cn_clip BERT's additive score for a pad key

// out[r] = LayerNorm(x[r] + add[r]) over d features (add may be null).
void add_layer_norm(const float* x, const float* add, int64_t rows, int64_t d, const float* g, const float* b,
                    double eps, float* out) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* o = out + r * d;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < d; ++j) {
        o[j] = x[r * d + j] + (add ? add[r * d + j] : 0.f);
        sum += o[j];
      }
      const float mean = sum / static_cast<float>(d);
      float sq = 0.f;
#pragma omp simd reduction(+ : sq)
      for (int64_t j = 0; j < d; ++j) sq += (o[j] - mean) * (o[j] - mean);
      const float inv = static_cast<float>(1.0 / std::sqrt(static_cast<double>(sq) / d + eps));
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) o[j] = (o[j] - mean) * inv * g[j] + b[j];
    }
  });
}

// Sequences up to this length run attention in the loops below; longer ones in ATen's fused attention, whose
// vectorised softmax wins once there are L^2 scores per head but whose set-up costs ~50 us a call (measured on a
// 2-core EPYC: 12 layers at L = 8 took 0.7 ms more through ATen; at L = 52, 2 ms less).
constexpr int64_t kLoopAttentionMaxLength = 16;

// ctx [B*L, H] from packed qkv [B*L, 3H]: per sequence and head, softmax(q k^T / sqrt(dh) + mask) v, where the
// additive mask is kMaskedScore on pad keys.
void attention_loops(const float* qkv, const int64_t* ids, int64_t batch, int64_t len, int64_t hidden,
                     int64_t heads, int64_t pad_id, float* ctx) {
  const int64_t dh = hidden / heads, stride = 3 * hidden;
  const float scale = 1.f / std::sqrt(static_cast<float>(dh));
  at::parallel_for(0, batch * heads, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> p(len);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / heads, h = task % heads;
      const float* base = qkv + b * len * stride;
      for (int64_t i = 0; i < len; ++i) {
        const float* q = base + i * stride + h * dh;
        float top = -INFINITY;
        for (int64_t j = 0; j < len; ++j) {
          const float* k = base + j * stride + hidden + h * dh;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t e = 0; e < dh; ++e) dot += q[e] * k[e];
          p[j] = dot * scale + (ids[b * len + j] == pad_id ? kMaskedScore : 0.f);
          top = std::max(top, p[j]);
        }
        float total = 0.f;
        for (int64_t j = 0; j < len; ++j) total += (p[j] = std::exp(p[j] - top));
        float* o = ctx + (b * len + i) * hidden + h * dh;
        std::fill(o, o + dh, 0.f);
        for (int64_t j = 0; j < len; ++j) {
          const float* v = base + j * stride + 2 * hidden + h * dh;
          const float weight = p[j] / total;
#pragma omp simd
          for (int64_t e = 0; e < dh; ++e) o[e] += weight * v[e];
        }
      }
    }
  });
}

// The additive key mask ATen's attention takes, [B, 1, 1, L], for sequences longer than the loops take; undefined
// (run the loops, which read the ids) otherwise.
at::Tensor attention_mask(const at::Tensor& ids, int64_t pad_id) {
  if (ids.size(1) <= kLoopAttentionMaxLength) return at::Tensor();
  return ids.eq(pad_id).to(at::kFloat).mul_(kMaskedScore).view({ids.size(0), 1, 1, ids.size(1)});
}

at::Tensor attention(const at::Tensor& qkv, const at::Tensor& ids, const at::Tensor& mask, int64_t heads,
                     int64_t pad_id) {
  const int64_t batch = ids.size(0), len = ids.size(1), hidden = qkv.size(1) / 3;
  if (!mask.defined()) {
    at::Tensor ctx = at::empty({batch * len, hidden}, at::kFloat);
    attention_loops(qkv.data_ptr<float>(), ids.data_ptr<int64_t>(), batch, len, hidden, heads, pad_id,
                    ctx.data_ptr<float>());
    return ctx;
  }
  const at::Tensor split = qkv.view({batch, len, 3, heads, hidden / heads}).permute({2, 0, 3, 1, 4});
  const at::Tensor out = at::scaled_dot_product_attention(split[0], split[1], split[2], mask);
  return out.transpose(1, 2).reshape({batch * len, hidden}).contiguous();
}

at::Tensor linear(const at::Tensor& x, const PackedLinear& layer) {
  at::Tensor out = at::empty({x.size(0), layer.n}, at::kFloat);
  int8_linear_into(x.data_ptr<float>(), x.size(0), layer, out.data_ptr<float>());
  return out;
}

at::Tensor norm(const at::Tensor& x, const at::Tensor& add, const float* g, const float* b, double eps) {
  at::Tensor out = at::empty_like(x);
  add_layer_norm(x.data_ptr<float>(), add.defined() ? add.data_ptr<float>() : nullptr, x.size(0), x.size(1), g, b,
                 eps, out.data_ptr<float>());
  return out;
}

}  // namespace

at::Tensor bert_int8_first_token(const at::Tensor& ids, const BertWeights& w, int64_t pad_id) {
  const int64_t batch = ids.size(0), len = ids.size(1), rows = batch * len, hidden = w.hidden;
  const int64_t* id = ids.data_ptr<int64_t>();
  at::Tensor embedded = at::empty({rows, hidden}, at::kFloat);
  float* e = embedded.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float *word = w.word + id[r] * hidden, *position = w.position + (r % len) * hidden;
    for (int64_t j = 0; j < hidden; ++j) e[r * hidden + j] = word[j] + position[j];
  }
  at::Tensor x = norm(embedded, at::Tensor(), w.ln_w, w.ln_b, w.eps);
  const at::Tensor first = at::arange(0, rows, len, at::kLong);  // each sequence's first row
  const at::Tensor mask = attention_mask(ids, pad_id);
  for (size_t i = 0; i < w.layers.size(); ++i) {
    const BertLayerWeights& layer = w.layers[i];
    at::Tensor ctx = attention(linear(x, layer.qkv), ids, mask, w.heads, pad_id);
    if (i + 1 == w.layers.size()) {
      ctx = ctx.index_select(0, first);
      x = x.index_select(0, first);
    }
    at::Tensor a = norm(linear(ctx, layer.out), x, layer.ln1_w, layer.ln1_b, w.eps);
    at::Tensor h = linear(a, layer.ffn1);
    at::gelu_(h);  // erf GELU, cn_clip BERT's "gelu"
    x = norm(linear(h, layer.ffn2), a, layer.ln2_w, layer.ln2_b, w.eps);
  }
  return x;
}

}  // namespace laclip
