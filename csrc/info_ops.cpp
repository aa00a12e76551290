// The extension's build and CPU-path facts and its test hooks, registered as torch.ops.cnclip.* (no tensors but
// chunked_topk_of_scores, so they take the catch-all kernel):
//   built_with_cuda() -> bool            whether the CUDA kernels were compiled in
//   cpu_isa() -> str, cpu_isas() -> str[]  the LACLIP CPU path in use / those this CPU can run, slowest first
//   set_max_isa(str name) -> ()          cap the CPU path ("" restores run-time selection)
//   int8_isa() -> str                    the int8 GEMM's path: avx512_vnni, avx2 or generic
//   topk_limits() -> (int, int)          the CUDA top-k's buffer budget (bytes) and minimum chunk width
//   plan_topk_chunks(...) -> (int, int, int), chunked_topk_of_scores(...) -> (Tensor, Tensor)
//                                        the CUDA top-k's chunk planning and merging, testable without a GPU
#include <torch/library.h>

#include "int8_linear.h"
#include "laclip.h"
#include "topk_chunks.h"

namespace laclip {
namespace {

#ifdef LACLIP_WITH_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

std::tuple<int64_t, int64_t, int64_t> plan_entry(int64_t Q, int64_t N, int64_t k, int64_t budget_bytes) {
  const TopkPlan plan = plan_topk_chunks(Q, N, k, budget_bytes);
  return {plan.q_chunk, plan.n_chunk, plan.peak_bytes};
}

}  // namespace
}  // namespace laclip

TORCH_LIBRARY_FRAGMENT(cnclip, m) {
  m.def("built_with_cuda() -> bool", []() { return laclip::kWithCuda; });
  m.def("cpu_isa() -> str", []() { return std::string(laclip::cpu_isa()); });
  m.def("cpu_isas() -> str[]", []() { return laclip::cpu_isas(); });
  m.def("set_max_isa(str name) -> ()", [](const std::string& name) { laclip::set_max_isa(name); });
  m.def("int8_isa() -> str", []() { return std::string(laclip::int8_isa()); });
  m.def("topk_limits() -> (int, int)",
        []() { return std::make_tuple(laclip::kTopkBudgetBytes, laclip::kTopkMinColumns); });
  const std::string plan_schema = "plan_topk_chunks(int Q, int N, int k, int budget_bytes=" +
                                  std::to_string(laclip::kTopkBudgetBytes) + ") -> (int, int, int)";
  m.def(plan_schema.c_str(), &laclip::plan_entry);
  m.def("chunked_topk_of_scores(Tensor scores, int k, int q_chunk, int n_chunk) -> (Tensor, Tensor)",
        &laclip::chunked_topk_of_scores);
}
