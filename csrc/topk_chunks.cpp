// Bounded-memory chunked top-k (see topk_chunks.h).
#include "topk_chunks.h"

#include <ATen/ops/bitwise_and.h>
#include <ATen/ops/bitwise_right_shift.h>
#include <ATen/ops/bitwise_xor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/topk.h>
#include <ATen/ops/where.h>
#include <ATen/TensorOperators.h>

#include <algorithm>

namespace laclip {
namespace {

// (values float32, indices int64) of keys made by topk_key.
std::tuple<at::Tensor, at::Tensor> decode_keys(const at::Tensor& keys) {
  const at::Tensor ordered = at::bitwise_right_shift(keys, 32).to(at::kInt);
  const at::Tensor bits = at::where(ordered >= 0, ordered, at::bitwise_xor(ordered, 0x7FFFFFFF));
  const at::Tensor indices = at::bitwise_and(keys, int64_t{0xFFFFFFFF}).neg_().add_(int64_t{0xFFFFFFFF});
  return {bits.view(at::kFloat), indices};
}

}  // namespace

int64_t chunk_footprint(int64_t q, int64_t n, int64_t k) { return q * (kTopkKeyBytes * n + 64 * k); }

TopkPlan plan_topk_chunks(int64_t Q, int64_t N, int64_t k, int64_t budget_bytes) {
  const int64_t min_columns = std::min(N, kTopkMinColumns);
  const int64_t widest = (budget_bytes / std::max<int64_t>(Q, 1) - 64 * k) / kTopkKeyBytes;
  const int64_t n_chunk = std::clamp(widest, min_columns, N);
  const int64_t q_chunk = std::clamp(budget_bytes / chunk_footprint(1, n_chunk, k), int64_t{1}, std::max<int64_t>(Q, 1));
  return {q_chunk, n_chunk, chunk_footprint(q_chunk, n_chunk, k)};
}

std::tuple<at::Tensor, at::Tensor> chunked_topk(int64_t Q, int64_t N, int64_t k, const TopkPlan& plan,
                                                const at::TensorOptions& options, const FillKeys& fill) {
  TORCH_CHECK_VALUE(N <= kTopkMaxImages, "laclip: top-k handles at most ", kTopkMaxImages, " images, got N = ", N);
  at::Tensor values = at::empty({Q, k}, options.dtype(at::kFloat));
  at::Tensor indices = at::empty({Q, k}, options.dtype(at::kLong));
  at::Tensor buffer = at::empty({plan.q_chunk * std::min(plan.n_chunk, N)}, options.dtype(at::kLong));
  for (int64_t q0 = 0; q0 < Q; q0 += plan.q_chunk) {
    const int64_t qn = std::min(plan.q_chunk, Q - q0);
    at::Tensor best;  // [qn, <= k] keys: the best so far, unordered
    for (int64_t n0 = 0; n0 < N; n0 += plan.n_chunk) {
      const int64_t nn = std::min(plan.n_chunk, N - n0);
      at::Tensor keys = buffer.narrow(0, 0, qn * nn).view({qn, nn});
      fill(q0, qn, n0, nn, keys);
      at::Tensor merged = std::get<0>(at::topk(keys, std::min(k, nn), 1, /*largest=*/true, /*sorted=*/false));
      if (best.defined()) merged = at::cat({best, merged}, 1);
      best = merged.size(1) > k ? std::get<0>(at::topk(merged, k, 1, /*largest=*/true, /*sorted=*/false)) : merged;
    }
    auto [v, i] = decode_keys(std::get<0>(at::sort(best, 1, /*descending=*/true)));
    values.narrow(0, q0, qn).copy_(v);
    indices.narrow(0, q0, qn).copy_(i);
  }
  return {values, indices};
}

std::tuple<at::Tensor, at::Tensor> chunked_topk_of_scores(const at::Tensor& scores, int64_t k, int64_t q_chunk,
                                                          int64_t n_chunk) {
  TORCH_CHECK_VALUE(scores.dim() == 2 && scores.scalar_type() == at::kFloat && scores.device().is_cpu(),
                    "laclip: scores must be a 2-D float32 CPU tensor, got ", scores.sizes(), " ",
                    scores.scalar_type(), " on ", scores.device());
  const int64_t Q = scores.size(0), N = scores.size(1);
  TORCH_CHECK_VALUE(Q > 0 && N > 0 && k >= 1 && k <= N, "laclip: need Q, N > 0 and k in 1..N, got Q = ", Q,
                    ", N = ", N, ", k = ", k);
  TORCH_CHECK_VALUE(q_chunk >= 1 && n_chunk >= 1, "laclip: chunks must be >= 1, got ", q_chunk, " x ", n_chunk);
  const at::Tensor s = scores.contiguous();
  const float* data = s.data_ptr<float>();
  const TopkPlan plan{q_chunk, n_chunk, chunk_footprint(q_chunk, n_chunk, k)};
  return chunked_topk(Q, N, k, plan, s.options(), [&](int64_t q0, int64_t qn, int64_t n0, int64_t nn, at::Tensor& keys) {
    int64_t* out = keys.data_ptr<int64_t>();
    for (int64_t i = 0; i < qn; ++i)
      for (int64_t j = 0; j < nn; ++j) out[i * nn + j] = topk_key(data[(q0 + i) * N + n0 + j], n0 + j);
  });
}

}  // namespace laclip
