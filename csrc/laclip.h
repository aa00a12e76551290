// LACLIP fused scoring kernels: shared declarations for the CPU (laclip_cpu.cpp), CUDA (laclip_cuda.cu)
// and Python binding (bindings.cpp) translation units.
//
// Inputs (validated and made contiguous by bindings.cpp before any kernel runs):
//   T [Q, D] text embeddings, G [N, D] global image embeddings, C [N, K, D] crop embeddings,
//   all float32 or all float16, on one device. Arithmetic is float32 throughout.
// score(q, n) = alpha * (g_n . t_q) + (1 - alpha) * sum_j w_j (c_nj . t_q)
//   w_j = softmax_j(c_nj . g_n / tau)   (weights_is_text == false, "image")
//   w_j = softmax_j(c_nj . t_q / tau)   (weights_is_text == true,  "text")
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace laclip {

// Full [Q, N] float32 score matrix.
at::Tensor scores_cpu(const at::Tensor& T, const at::Tensor& G, const at::Tensor& C, double alpha, double tau,
                      bool weights_is_text);

// Fused top-k: values [Q, k] float32 and indices [Q, k] int64, best first, ties to the lower index.
// Never materialises [Q, N]: per-thread heaps of k entries per query, merged at the end.
std::tuple<at::Tensor, at::Tensor> topk_cpu(const at::Tensor& T, const at::Tensor& G, const at::Tensor& C,
                                            int64_t k, double alpha, double tau, bool weights_is_text);

// Which CPU code path runs: "avx512" (runtime-detected) or "generic" (portable loops).
const char* cpu_isa();
// Force the generic path (true) or restore automatic detection (false); for tests and benchmarks.
void set_force_generic(bool force);

#ifdef LACLIP_WITH_CUDA
at::Tensor scores_cuda(const at::Tensor& T, const at::Tensor& G, const at::Tensor& C, double alpha, double tau,
                       bool weights_is_text);
std::tuple<at::Tensor, at::Tensor> topk_cuda(const at::Tensor& T, const at::Tensor& G, const at::Tensor& C,
                                             int64_t k, double alpha, double tau, bool weights_is_text);
#endif

}  // namespace laclip
