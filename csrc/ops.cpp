// The LACLIP operators, registered with the PyTorch dispatcher as torch.ops.cnclip.*:
//   laclip_scores(Tensor t, Tensor g, Tensor c, float alpha, float tau, bool text_weights) -> Tensor
//   laclip_topk(Tensor t, Tensor g, Tensor c, int k, float alpha, float tau, bool text_weights) -> (Tensor, Tensor)
// torch picks the CPU or CUDA kernel from the inputs' device; the fake (meta) kernels that give output shapes to
// torch.compile live in engine/ops.py. This file is the only place inputs are checked: a bad input raises
// c10::ValueError (Python ValueError) naming the tensor, before any kernel runs.
#include <torch/library.h>

#include "laclip.h"

namespace laclip {
namespace {

constexpr const char* kT = "text embeddings T";
constexpr const char* kG = "global image embeddings G";
constexpr const char* kC = "crop embeddings C";

void check_tensor(const at::Tensor& x, const char* name, int64_t dim, const char* shape) {
  TORCH_CHECK_VALUE(x.defined(), "laclip: ", name, " is an undefined tensor");
  TORCH_CHECK_VALUE(x.dim() == dim, "laclip: ", name, " must be ", dim, "-D ", shape, ", got ", x.dim(),
                    "-D with shape ", x.sizes());
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                        x.scalar_type() == at::kBFloat16,
                    "laclip: ", name, " must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device().is_cpu() || x.device().is_cuda(), "laclip: ", name,
                    " must be on the CPU or a CUDA device, got ", x.device());
}

void check_same(const at::Tensor& x, const char* name, const at::Tensor& T) {
  TORCH_CHECK_VALUE(x.scalar_type() == T.scalar_type(), "laclip: ", name, " has dtype ", x.scalar_type(), " but ",
                    kT, " has dtype ", T.scalar_type(), "; all three must share one dtype");
  TORCH_CHECK_VALUE(x.device() == T.device(), "laclip: ", name, " is on ", x.device(), " but ", kT, " is on ",
                    T.device(), "; all three must be on one device");
}

// Validates and returns contiguous copies (views when already contiguous).
std::tuple<at::Tensor, at::Tensor, at::Tensor> checked(const at::Tensor& T, const at::Tensor& G,
                                                       const at::Tensor& C, double alpha, double tau) {
  check_tensor(T, kT, 2, "[Q, D]");
  check_tensor(G, kG, 2, "[N, D]");
  check_tensor(C, kC, 3, "[N, K, D]");
  check_same(G, kG, T);
  check_same(C, kC, T);
  const int64_t Q = T.size(0), D = T.size(1), N = G.size(0), K = C.size(1);
  TORCH_CHECK_VALUE(Q > 0, "laclip: ", kT, " has no rows (Q = 0), shape ", T.sizes());
  TORCH_CHECK_VALUE(D > 0, "laclip: ", kT, " has D = 0, shape ", T.sizes());
  TORCH_CHECK_VALUE(N > 0, "laclip: ", kG, " has no images (N = 0), shape ", G.sizes());
  TORCH_CHECK_VALUE(G.size(1) == D, "laclip: ", kG, " has D = ", G.size(1), " but ", kT, " has D = ", D);
  TORCH_CHECK_VALUE(C.size(0) == N, "laclip: ", kC, " has N = ", C.size(0), " images but ", kG, " has N = ", N);
  TORCH_CHECK_VALUE(K > 0, "laclip: ", kC, " has no crops (K = 0), shape ", C.sizes());
  TORCH_CHECK_VALUE(C.size(2) == D, "laclip: ", kC, " has D = ", C.size(2), " but ", kT, " has D = ", D);
  TORCH_CHECK_VALUE(alpha >= 0.0 && alpha <= 1.0, "laclip: alpha must be in [0, 1], got ", alpha);
  TORCH_CHECK_VALUE(tau > 0.0, "laclip: tau must be > 0, got ", tau);  // also refuses NaN
  TORCH_CHECK_VALUE(N * K < (int64_t{1} << 62) / D, "laclip: ", kC, " is too large, shape ", C.sizes());
  return {T.contiguous(), G.contiguous(), C.contiguous()};
}

void check_k(int64_t k, int64_t N) {
  TORCH_CHECK_VALUE(k >= 1 && k <= N, "laclip: k must be in 1..N (N = ", N, " images in ", kG, "), got ", k);
}

at::Tensor scores_cpu_entry(const at::Tensor& T, const at::Tensor& G, const at::Tensor& C, double alpha,
                            double tau, bool text_weights) {
  auto [t, g, c] = checked(T, G, C, alpha, tau);
  return scores_cpu(t, g, c, alpha, tau, text_weights);
}

std::tuple<at::Tensor, at::Tensor> topk_cpu_entry(const at::Tensor& T, const at::Tensor& G, const at::Tensor& C,
                                                  int64_t k, double alpha, double tau, bool text_weights) {
  auto [t, g, c] = checked(T, G, C, alpha, tau);
  check_k(k, g.size(0));
  return topk_cpu(t, g, c, k, alpha, tau, text_weights);
}

#ifdef LACLIP_WITH_CUDA
at::Tensor scores_cuda_entry(const at::Tensor& T, const at::Tensor& G, const at::Tensor& C, double alpha,
                             double tau, bool text_weights) {
  auto [t, g, c] = checked(T, G, C, alpha, tau);
  return scores_cuda(t, g, c, alpha, tau, text_weights);
}

std::tuple<at::Tensor, at::Tensor> topk_cuda_entry(const at::Tensor& T, const at::Tensor& G, const at::Tensor& C,
                                                   int64_t k, double alpha, double tau, bool text_weights) {
  auto [t, g, c] = checked(T, G, C, alpha, tau);
  check_k(k, g.size(0));
  return topk_cuda(t, g, c, k, alpha, tau, text_weights);
}
#else
// CUDA inputs reach this build only to be told why they cannot run (after the same checks as every call).
[[noreturn]] void no_cuda_build(const at::Tensor& T) {
  TORCH_CHECK_VALUE(false, "laclip: ", kT, " is on ", T.device(),
                    " but engine._laclip_ext was built without CUDA (rebuild with a CUDA toolkit on PATH)");
  std::abort();
}

at::Tensor scores_cuda_entry(const at::Tensor& T, const at::Tensor& G, const at::Tensor& C, double alpha,
                             double tau, bool /*text_weights*/) {
  checked(T, G, C, alpha, tau);
  no_cuda_build(T);
}

std::tuple<at::Tensor, at::Tensor> topk_cuda_entry(const at::Tensor& T, const at::Tensor& G, const at::Tensor& C,
                                                   int64_t k, double alpha, double tau, bool /*text_weights*/) {
  checked(T, G, C, alpha, tau);
  check_k(k, G.size(0));
  no_cuda_build(T);
}
#endif

}  // namespace
}  // namespace laclip

TORCH_LIBRARY(cnclip, m) {
  m.set_python_module("engine.ops");  // where the fake (meta) kernels are registered
  m.def("laclip_scores(Tensor t, Tensor g, Tensor c, float alpha, float tau, bool text_weights) -> Tensor");
  m.def("laclip_topk(Tensor t, Tensor g, Tensor c, int k, float alpha, float tau, bool text_weights) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cnclip, CPU, m) {
  m.impl("laclip_scores", &laclip::scores_cpu_entry);
  m.impl("laclip_topk", &laclip::topk_cpu_entry);
}

TORCH_LIBRARY_IMPL(cnclip, CUDA, m) {
  m.impl("laclip_scores", &laclip::scores_cuda_entry);
  m.impl("laclip_topk", &laclip::topk_cuda_entry);
}
