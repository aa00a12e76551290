// Python module engine._laclip_ext: importing it registers the torch.ops.cnclip operators (ops.cpp); the functions
// here only describe and steer the build (import it only through engine/ops.py).
#include <torch/extension.h>

#include "int8_linear.h"
#include "laclip.h"
#include "topk_chunks.h"

#ifdef LACLIP_WITH_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "LACLIP fused scoring kernels (CPU" + std::string(kWithCuda ? " + CUDA" : "") +
            "), registered as torch.ops.cnclip.*; use engine.ops.";
  m.def("built_with_cuda", []() { return kWithCuda; }, "Whether the CUDA kernels were compiled in.");
  m.def("cpu_isa", &laclip::cpu_isa,
        "The CPU code path in use: 'amx_bf16', 'avx512_bf16', 'avx512', 'avx2' or 'generic'.");
  m.def("int8_isa", &laclip::int8_isa,
        "The int8 GEMM's code path: 'avx512_vnni', 'avx2' or 'generic' (capped by set_max_isa).");
  m.def("cpu_isas", &laclip::cpu_isas, "The CPU code paths this CPU can run, slowest first.");
  m.def("set_max_isa", &laclip::set_max_isa, py::arg("name"),
        "Cap the CPU code path at `name`, or '' to restore run-time selection.");
  m.def(
      "plan_topk_chunks",
      [](int64_t Q, int64_t N, int64_t k, int64_t budget_bytes) {
        const laclip::TopkPlan plan = laclip::plan_topk_chunks(Q, N, k, budget_bytes);
        return std::make_tuple(plan.q_chunk, plan.n_chunk, plan.peak_bytes);
      },
      py::arg("Q"), py::arg("N"), py::arg("k"), py::arg("budget_bytes") = laclip::kTopkBudgetBytes,
      "The CUDA top-k's chunking: (queries per chunk, images per chunk, buffer bytes).");
  m.def("chunked_topk_of_scores", &laclip::chunked_topk_of_scores, py::arg("scores"), py::arg("k"),
        py::arg("q_chunk"), py::arg("n_chunk"), py::call_guard<py::gil_scoped_release>(),
        "The CUDA top-k's chunk-and-merge driver over a CPU score matrix (tests).");
  m.attr("topk_budget_bytes") = laclip::kTopkBudgetBytes;
  m.attr("topk_min_columns") = laclip::kTopkMinColumns;
}
