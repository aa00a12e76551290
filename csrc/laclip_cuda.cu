// LACLIP fused scoring on CUDA.
//
// One warp scores one image against a group of kQPW queries: lanes stride over D, so every global/crop row is
// read once per query group (coalesced) and reused from registers for all queries of the group; partial dots are
// reduced with warp shuffles. The K-softmax is computed online (running max, running sum of exponentials and
// running weighted sum), so no per-crop array is kept and no [Q, N, K] intermediate exists. fp32 accumulation;
// float32, float16 and bfloat16 inputs.
//
// Top-k never stores [Q, N]: chunked_topk (topk_chunks.h) cuts the work into chunks of queries x images within a
// fixed memory budget; the kernel writes each chunk as int64 sort keys (score, then lower index), which
// torch.topk selects from and merges with the running best list. Extra memory: at most kTopkBudgetBytes for any Q
// (unless k alone needs more for one query).
#include "laclip.h"
#include "topk_chunks.h"

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace laclip {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kQPW = 4;  // queries per warp

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(at::Half x) { return static_cast<float>(x); }
__device__ __forceinline__ float to_float(at::BFloat16 x) { return static_cast<float>(x); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Scores of images [n_begin, n_begin + n_count) for Q queries (rows of T), into out[q * n_count + (n - n_begin)],
// or, when keys is not null, their top-k sort keys into keys[q * n_count + (n - n_begin)].
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    laclip_scores_kernel(const float* __restrict__ T, const scalar_t* __restrict__ G,
                         const scalar_t* __restrict__ C, int64_t Q, int64_t K, int64_t D, float alpha,
                         float inv_tau, bool text, int64_t n_begin, int64_t n_count, float* __restrict__ out,
                         int64_t* __restrict__ keys) {
  const int lane = threadIdx.x & 31;
  const int64_t qgroups = (Q + kQPW - 1) / kQPW;
  const int64_t total = n_count * qgroups;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); w < total; w += stride) {
    const int64_t n = n_begin + w / qgroups;  // neighbouring warps share an image (L1 reuse of its rows)
    const int64_t q0 = (w % qgroups) * kQPW;
    const float* t[kQPW];
#pragma unroll
    for (int i = 0; i < kQPW; ++i) t[i] = T + (q0 + i < Q ? q0 + i : Q - 1) * D;  // extra queries: computed, not written
    const scalar_t* g = G + n * D;

    float gs[kQPW];
#pragma unroll
    for (int i = 0; i < kQPW; ++i) gs[i] = 0.f;
    for (int64_t d = lane; d < D; d += 32) {
      const float gv = to_float(g[d]);
#pragma unroll
      for (int i = 0; i < kQPW; ++i) gs[i] = fmaf(gv, __ldg(t[i] + d), gs[i]);
    }
#pragma unroll
    for (int i = 0; i < kQPW; ++i) gs[i] = warp_sum(gs[i]);

    float mx[kQPW], esum[kQPW], wsum[kQPW];
#pragma unroll
    for (int i = 0; i < kQPW; ++i) {
      mx[i] = -INFINITY;
      esum[i] = 0.f;
      wsum[i] = 0.f;
    }
    for (int64_t j = 0; j < K; ++j) {
      const scalar_t* c = C + (n * K + j) * D;
      float cs[kQPW];
#pragma unroll
      for (int i = 0; i < kQPW; ++i) cs[i] = 0.f;
      float cg = 0.f;
      for (int64_t d = lane; d < D; d += 32) {
        const float cv = to_float(c[d]);
#pragma unroll
        for (int i = 0; i < kQPW; ++i) cs[i] = fmaf(cv, __ldg(t[i] + d), cs[i]);
        if (!text) cg = fmaf(cv, to_float(g[d]), cg);
      }
#pragma unroll
      for (int i = 0; i < kQPW; ++i) cs[i] = warp_sum(cs[i]);
      if (!text) cg = warp_sum(cg);
#pragma unroll
      for (int i = 0; i < kQPW; ++i) {
        const float key = text ? cs[i] : cg;
        const float m_new = fmaxf(mx[i], key);
        const float rescale = expf((mx[i] - m_new) * inv_tau);  // 0 on the first crop (mx = -inf)
        const float e = expf((key - m_new) * inv_tau);
        esum[i] = esum[i] * rescale + e;
        wsum[i] = wsum[i] * rescale + e * cs[i];
        mx[i] = m_new;
      }
    }
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < kQPW; ++i) {
        if (q0 + i >= Q) continue;
        const float score = alpha * gs[i] + (1.f - alpha) * (wsum[i] / esum[i]);
        const int64_t pos = (q0 + i) * n_count + (n - n_begin);
        if (keys != nullptr)
          keys[pos] = topk_key(score, n);
        else
          out[pos] = score;
      }
    }
  }
}

// Scores (out) or sort keys (keys) of queries [q0, q0 + q_count) x images [n_begin, n_begin + n_count).
template <typename scalar_t>
void launch_typed(const at::Tensor& Tf, const at::Tensor& G, const at::Tensor& C, float alpha, float inv_tau,
                  bool text, int64_t q0, int64_t q_count, int64_t n_begin, int64_t n_count, float* out,
                  int64_t* keys) {
  const int64_t D = Tf.size(1), K = C.size(1);
  const int64_t total_warps = n_count * ((q_count + kQPW - 1) / kQPW);
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((total_warps + kWarps - 1) / kWarps, 1 << 20));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  laclip_scores_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      Tf.data_ptr<float>() + q0 * D, G.data_ptr<scalar_t>(), C.data_ptr<scalar_t>(), q_count, K, D, alpha,
      inv_tau, text, n_begin, n_count, out, keys);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_scores(const at::Tensor& Tf, const at::Tensor& G, const at::Tensor& C, double alpha, double tau,
                   bool text, int64_t q0, int64_t q_count, int64_t n_begin, int64_t n_count, float* out,
                   int64_t* keys) {
  const float inv_tau =
      static_cast<float>(std::min<double>(1.0 / tau, static_cast<double>(std::numeric_limits<float>::max())));
  const float a = static_cast<float>(alpha);
  switch (G.scalar_type()) {
    case at::kHalf:
      launch_typed<at::Half>(Tf, G, C, a, inv_tau, text, q0, q_count, n_begin, n_count, out, keys);
      break;
    case at::kBFloat16:
      launch_typed<at::BFloat16>(Tf, G, C, a, inv_tau, text, q0, q_count, n_begin, n_count, out, keys);
      break;
    default:
      launch_typed<float>(Tf, G, C, a, inv_tau, text, q0, q_count, n_begin, n_count, out, keys);
  }
}

}  // namespace

at::Tensor scores_cuda(const at::Tensor& T, const at::Tensor& G, const at::Tensor& C, double alpha, double tau,
                       bool weights_is_text) {
  const c10::cuda::CUDAGuard guard(T.device());
  const at::Tensor Tf = T.to(at::kFloat).contiguous();
  const int64_t Q = T.size(0), N = G.size(0);
  at::Tensor out = at::empty({Q, N}, T.options().dtype(at::kFloat));
  launch_scores(Tf, G, C, alpha, tau, weights_is_text, 0, Q, 0, N, out.data_ptr<float>(), nullptr);
  return out;
}

std::tuple<at::Tensor, at::Tensor> topk_cuda(const at::Tensor& T, const at::Tensor& G, const at::Tensor& C,
                                             int64_t k, double alpha, double tau, bool weights_is_text) {
  const c10::cuda::CUDAGuard guard(T.device());
  const at::Tensor Tf = T.to(at::kFloat).contiguous();
  const int64_t Q = T.size(0), N = G.size(0);
  const TopkPlan plan = plan_topk_chunks(Q, N, k);
  return chunked_topk(Q, N, k, plan, T.options(),
                      [&](int64_t q0, int64_t q_count, int64_t n0, int64_t n_count, at::Tensor& keys) {
                        launch_scores(Tf, G, C, alpha, tau, weights_is_text, q0, q_count, n0, n_count, nullptr,
                                      keys.data_ptr<int64_t>());
                      });
}

}  // namespace laclip
