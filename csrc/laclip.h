// LACLIP fused scoring kernels: shared declarations for the CPU (laclip_cpu.cpp), CUDA (laclip_cuda.cu),
// operator registration (ops.cpp) and build-facts registration (info_ops.cpp) translation units.
//
// Inputs (validated and made contiguous by ops.cpp, the only entry, before any kernel runs):
//   T [Q, D] text embeddings, G [N, D] global image embeddings, C [N, K, D] crop embeddings,
//   all float32, all float16 or all bfloat16, on one device. Arithmetic is float32 throughout.
// score(q, n) = alpha * (g_n . t_q) + (1 - alpha) * sum_j w_j (c_nj . t_q)
//   w_j = softmax_j(c_nj . g_n / tau)   (weights_is_text == false, "image")
//   w_j = softmax_j(c_nj . t_q / tau)   (weights_is_text == true,  "text")
#pragma once

#include <ATen/core/Tensor.h>  // not ATen/ATen.h: each source includes the ATen/ops it calls (build time)

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

namespace laclip {

// Full [Q, N] float32 score matrix.
at::Tensor scores_cpu(const at::Tensor& T, const at::Tensor& G, const at::Tensor& C, double alpha, double tau,
                      bool weights_is_text);

// Fused top-k: values [Q, k] float32 and indices [Q, k] int64, best first, ties to the lower index.
// Never materialises [Q, N]: per-thread heaps of k entries per query, merged at the end.
std::tuple<at::Tensor, at::Tensor> topk_cpu(const at::Tensor& T, const at::Tensor& G, const at::Tensor& C,
                                            int64_t k, double alpha, double tau, bool weights_is_text);

// CPU code paths, slowest first: "generic" (portable loops), "avx512" (AVX-512F), "avx512_bf16" (AVX-512F plus
// the BF16 dot-product instruction, used for bfloat16 inputs). All detected at run time.
// The path in use: the fastest this CPU supports, capped by set_max_isa.
const char* cpu_isa();
// The paths this CPU can run, slowest first.
std::vector<std::string> cpu_isas();
// Cap the path ("generic", "avx512", "avx512_bf16"), or "" to restore automatic selection; for tests/benchmarks.
void set_max_isa(const std::string& name);

#ifdef LACLIP_WITH_CUDA
at::Tensor scores_cuda(const at::Tensor& T, const at::Tensor& G, const at::Tensor& C, double alpha, double tau,
                       bool weights_is_text);
std::tuple<at::Tensor, at::Tensor> topk_cuda(const at::Tensor& T, const at::Tensor& G, const at::Tensor& C,
                                             int64_t k, double alpha, double tau, bool weights_is_text);
#endif

}  // namespace laclip
