// Python bindings of the LACLIP kernels (module engine._laclip_ext; import it only through engine/ops.py).
// Every input is validated here, before any kernel runs: a bad input raises ValueError naming the tensor.
#include <torch/extension.h>

#include "laclip.h"

namespace {

constexpr const char* kT = "text embeddings T";
constexpr const char* kG = "global image embeddings G";
constexpr const char* kC = "crop embeddings C";

void check_tensor(const at::Tensor& x, const char* name, int64_t dim, const char* shape) {
  TORCH_CHECK_VALUE(x.defined(), "laclip: ", name, " is an undefined tensor");
  TORCH_CHECK_VALUE(x.dim() == dim, "laclip: ", name, " must be ", dim, "-D ", shape, ", got ", x.dim(),
                    "-D with shape ", x.sizes());
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf, "laclip: ", name,
                    " must be float32 or float16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device().is_cpu() || x.device().is_cuda(), "laclip: ", name,
                    " must be on the CPU or a CUDA device, got ", x.device());
}

// Validates and returns contiguous copies (views when already contiguous).
std::tuple<at::Tensor, at::Tensor, at::Tensor> checked(const at::Tensor& T, const at::Tensor& G,
                                                       const at::Tensor& C, double alpha, double tau) {
  check_tensor(T, kT, 2, "[Q, D]");
  check_tensor(G, kG, 2, "[N, D]");
  check_tensor(C, kC, 3, "[N, K, D]");
  TORCH_CHECK_VALUE(G.scalar_type() == T.scalar_type(), "laclip: ", kG, " has dtype ", G.scalar_type(),
                    " but ", kT, " has dtype ", T.scalar_type(), "; all three must share one dtype");
  TORCH_CHECK_VALUE(C.scalar_type() == T.scalar_type(), "laclip: ", kC, " has dtype ", C.scalar_type(),
                    " but ", kT, " has dtype ", T.scalar_type(), "; all three must share one dtype");
  TORCH_CHECK_VALUE(G.device() == T.device(), "laclip: ", kG, " is on ", G.device(), " but ", kT, " is on ",
                    T.device(), "; all three must be on one device");
  TORCH_CHECK_VALUE(C.device() == T.device(), "laclip: ", kC, " is on ", C.device(), " but ", kT, " is on ",
                    T.device(), "; all three must be on one device");
  const int64_t Q = T.size(0), D = T.size(1), N = G.size(0), K = C.size(1);
  TORCH_CHECK_VALUE(Q > 0, "laclip: ", kT, " has no rows (Q = 0), shape ", T.sizes());
  TORCH_CHECK_VALUE(D > 0, "laclip: ", kT, " has D = 0, shape ", T.sizes());
  TORCH_CHECK_VALUE(N > 0, "laclip: ", kG, " has no images (N = 0), shape ", G.sizes());
  TORCH_CHECK_VALUE(G.size(1) == D, "laclip: ", kG, " has D = ", G.size(1), " but ", kT, " has D = ", D);
  TORCH_CHECK_VALUE(C.size(0) == N, "laclip: ", kC, " has N = ", C.size(0), " images but ", kG, " has N = ", N);
  TORCH_CHECK_VALUE(K > 0, "laclip: ", kC, " has no crops (K = 0), shape ", C.sizes());
  TORCH_CHECK_VALUE(C.size(2) == D, "laclip: ", kC, " has D = ", C.size(2), " but ", kT, " has D = ", D);
  TORCH_CHECK_VALUE(alpha >= 0.0 && alpha <= 1.0, "laclip: alpha must be in [0, 1], got ", alpha);
  TORCH_CHECK_VALUE(tau > 0.0, "laclip: tau must be > 0, got ", tau);
  TORCH_CHECK_VALUE(N * K < (int64_t{1} << 62) / D, "laclip: ", kC, " is too large, shape ", C.sizes());
  return {T.contiguous(), G.contiguous(), C.contiguous()};
}

#ifdef LACLIP_WITH_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

void require_cuda_build(const at::Tensor& T) {
  TORCH_CHECK_VALUE(kWithCuda, "laclip: ", kT, " is on ", T.device(),
                    " but engine._laclip_ext was built without CUDA (rebuild with a CUDA toolkit on PATH)");
}

at::Tensor scores(const at::Tensor& T, const at::Tensor& G, const at::Tensor& C, double alpha, double tau,
                  bool weights_is_text) {
  auto [t, g, c] = checked(T, G, C, alpha, tau);
  if (t.is_cuda()) {
    require_cuda_build(t);
#ifdef LACLIP_WITH_CUDA
    return laclip::scores_cuda(t, g, c, alpha, tau, weights_is_text);
#endif
  }
  return laclip::scores_cpu(t, g, c, alpha, tau, weights_is_text);
}

std::tuple<at::Tensor, at::Tensor> topk(const at::Tensor& T, const at::Tensor& G, const at::Tensor& C, int64_t k,
                                        double alpha, double tau, bool weights_is_text) {
  auto [t, g, c] = checked(T, G, C, alpha, tau);
  const int64_t N = g.size(0);
  TORCH_CHECK_VALUE(k >= 1 && k <= N, "laclip: k must be in 1..N (N = ", N, " images in ", kG, "), got ", k);
  if (t.is_cuda()) {
    require_cuda_build(t);
#ifdef LACLIP_WITH_CUDA
    return laclip::topk_cuda(t, g, c, k, alpha, tau, weights_is_text);
#endif
  }
  return laclip::topk_cpu(t, g, c, k, alpha, tau, weights_is_text);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "LACLIP fused scoring kernels (CPU" + std::string(kWithCuda ? " + CUDA" : "") + "); use engine.ops.";
  m.def("scores", &scores, py::arg("T"), py::arg("G"), py::arg("C"), py::arg("alpha"), py::arg("tau"),
        py::arg("weights_is_text"), py::call_guard<py::gil_scoped_release>(),
        "[Q, N] float32 LACLIP scores of T [Q, D] against images G [N, D] with crops C [N, K, D].");
  m.def("topk", &topk, py::arg("T"), py::arg("G"), py::arg("C"), py::arg("k"), py::arg("alpha"), py::arg("tau"),
        py::arg("weights_is_text"), py::call_guard<py::gil_scoped_release>(),
        "Fused top-k: (values [Q, k] float32, indices [Q, k] int64), best first, ties to the lower index.");
  m.def("built_with_cuda", []() { return kWithCuda; }, "Whether the CUDA kernels were compiled in.");
  m.def("cpu_isa", &laclip::cpu_isa, "The CPU code path in use: 'avx512' or 'generic'.");
  m.def("set_force_generic", &laclip::set_force_generic, py::arg("force"),
        "Force the portable CPU path (True) or restore run-time detection (False).");
}
