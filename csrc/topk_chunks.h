// Bounded-memory top-k over a score matrix produced in chunks (the CUDA top-k's driver; device-agnostic ATen code,
// so its planning and merging are tested on the CPU).
//
// Scores are written as int64 keys: the high 32 bits order like the float score, the low 32 bits hold
// 0xFFFFFFFF - image index, so the larger key is the better score and, on equal scores, the lower index. Keys are
// unique, so torch.topk selects exactly (no tie handling, no sort of the whole chunk, no index copies) and the
// ties-to-lower-index rule holds by construction.
#pragma once

#include <ATen/core/Tensor.h>  // not ATen/ATen.h: each source includes the ATen/ops it calls (build time)

#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>

#ifdef __CUDACC__
#define LACLIP_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LACLIP_HOST_DEVICE inline
#endif

namespace laclip {

// Extra device memory the top-k may use for its chunk buffers (16M floats' worth).
constexpr int64_t kTopkBudgetBytes = int64_t{64} << 20;
// Narrowest chunk of images (keeps each scoring launch large enough to fill a GPU), unless N is smaller.
constexpr int64_t kTopkMinColumns = 1024;
// Largest image count the 32-bit index field of a key holds.
constexpr int64_t kTopkMaxImages = (int64_t{1} << 32) - 1;

// The sort key of (score, image index n). -0.0 is folded into +0.0 so the two compare equal, as floats do.
LACLIP_HOST_DEVICE int64_t topk_key(float score, int64_t n) {
  if (score == 0.f) score = 0.f;
  int32_t bits;
#ifdef __CUDA_ARCH__
  bits = __float_as_int(score);
#else
  std::memcpy(&bits, &score, sizeof(bits));
#endif
  const int32_t ordered = bits >= 0 ? bits : bits ^ 0x7FFFFFFF;  // signed order of ordered == float order
  const uint64_t high = static_cast<uint64_t>(static_cast<int64_t>(ordered)) << 32;
  return static_cast<int64_t>(high | (uint64_t{0xFFFFFFFFu} - static_cast<uint64_t>(n)));
}

// How to cut a [Q, N] top-k into chunks: q_chunk queries x n_chunk images at a time.
struct TopkPlan {
  int64_t q_chunk;
  int64_t n_chunk;
  int64_t peak_bytes;  // the chunk buffers' footprint at this plan (chunk_footprint)
};

// Bytes a chunk's key costs: the int64 key plus torch.topk's selection scratch (measured on an H200: ~0.9 byte per
// key of a 64 MB chunk; 2 are counted).
constexpr int64_t kTopkKeyBytes = 10;

// Bytes held at once for a chunk of q queries x n images: the keys and topk's scratch (kTopkKeyBytes n per query)
// plus the running best list, the chunk's selection and the merge temporaries (at most 8 lists of k keys/indices
// per query).
int64_t chunk_footprint(int64_t q, int64_t n, int64_t k);

// Chunks as wide as the budget allows with every query in one chunk (at least min(N, kTopkMinColumns) images),
// then as many queries per chunk as the budget allows (at least one). peak_bytes <= budget_bytes whenever one
// query of the narrowest chunk fits the budget; otherwise one query at a time.
TopkPlan plan_topk_chunks(int64_t Q, int64_t N, int64_t k, int64_t budget_bytes = kTopkBudgetBytes);

// Fills keys [q_count, n_count] (contiguous int64, on the output device) with topk_key(score(q0 + i, n0 + j), n0 + j).
using FillKeys = std::function<void(int64_t q0, int64_t q_count, int64_t n0, int64_t n_count, at::Tensor& keys)>;

// Top-k by chunks: (values [Q, k] float32, indices [Q, k] int64) on `options`' device, best first.
std::tuple<at::Tensor, at::Tensor> chunked_topk(int64_t Q, int64_t N, int64_t k, const TopkPlan& plan,
                                                const at::TensorOptions& options, const FillKeys& fill);

// chunked_topk over a given CPU score matrix (tests of the planning and merging without a GPU).
std::tuple<at::Tensor, at::Tensor> chunked_topk_of_scores(const at::Tensor& scores, int64_t k, int64_t q_chunk,
                                                          int64_t n_chunk);

}  // namespace laclip
