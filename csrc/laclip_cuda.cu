// LACLIP fused scoring on CUDA, written for Hopper (H100/H200) and built for Ampere too.
//
// Three kernels, chosen per launch by launch_scores (the choice never changes a result beyond fp32 rounding):
//   small   Q <= 8 per pass, CUDA cores. Eight lanes score one image with 16-byte loads (8 fp16/bf16 or 4 fp32
//           values per lane per step); the pass's queries sit in shared memory in fp32; partial dots are reduced
//           over the 8 lanes with 3 shuffles. Needs 16-byte aligned rows (D a multiple of 8 for 2-byte types).
//   tensor  Q >= 9, fp16/bf16 rows, D a multiple of 16, global-only or query-aware weights: persistent blocks
//           hold up to 64 queries in shared memory; a warp multiplies a 16-row tile (16 images' global rows, or 16
//           crop rows, read once with 8 fragments in flight) by them with WMMA (fp32 accumulation; the queries
//           are in the rows' dtype, so the products are exact). The K-softmax is fused into the epilogue.
//   generic any shape or alignment: one warp per image, lanes stride over D (the first kernel, kept as the
//           fallback the others are tested against on the same inputs).
// The weight mode is a template parameter: Global (alpha = 1: plain CLIP, crops never read), Image (w from
// c . g) or Text (w from c . t). The K-softmax is computed online (running max, sum and weighted sum), so no
// [Q, N, K] intermediate exists.
//
// Top-k never stores [Q, N]: chunked_topk (topk_chunks.h) cuts the work into chunks within a fixed memory budget;
// the kernels write each chunk as int64 sort keys (score, then lower index), which torch.topk selects from on the
// device. Only the k results per query leave the device.
#include "laclip.h"
#include "topk_chunks.h"

#include <ATen/ops/empty.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace laclip {
namespace {

enum class Mode : int { Global = 0, Image = 1, Text = 2 };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(at::Half x) { return static_cast<float>(x); }
__device__ __forceinline__ float to_float(at::BFloat16 x) { return static_cast<float>(x); }

// Where a launch writes: column (n - out_n0) of row q of a [*, ld] output (scores or top-k keys).
struct Output {
  float* scores;  // null when writing keys
  int64_t* keys;
  int64_t out_n0;
  int64_t ld;
  int64_t row0;  // output row of the launch's first query

  __device__ __forceinline__ void put(int64_t q, int64_t n, float score) const {
    const int64_t pos = (row0 + q) * ld + (n - out_n0);
    if (keys != nullptr)
      keys[pos] = topk_key(score, n);
    else
      scores[pos] = score;
  }
};

// One online-softmax step over crops: state (mx, esum, wsum) after a crop of similarity `sim` and key `key`.
__device__ __forceinline__ void softmax_step(float key, float sim, float inv_tau, float& mx, float& esum,
                                             float& wsum) {
  const float m_new = fmaxf(mx, key);
  const float rescale = expf((mx - m_new) * inv_tau);  // 0 on the first crop (mx = -inf)
  const float e = expf((key - m_new) * inv_tau);
  esum = esum * rescale + e;
  wsum = wsum * rescale + e * sim;
  mx = m_new;
}

// ------------------------------------------------------------------------------------------- generic kernel
constexpr int kGenericThreads = 256;
constexpr int kGenericWarps = kGenericThreads / 32;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// One warp per (image, query): lanes stride over D. Any D, any alignment.
template <typename scalar_t, Mode MODE>
__global__ void __launch_bounds__(kGenericThreads)
    generic_kernel(const float* __restrict__ T, const scalar_t* __restrict__ G, const scalar_t* __restrict__ C,
                   int64_t Q, int64_t K, int64_t D, float alpha, float inv_tau, int64_t n_first, int64_t n_count,
                   Output out) {
  const int lane = threadIdx.x & 31;
  const int64_t total = n_count * Q;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kGenericWarps;
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * kGenericWarps + (threadIdx.x >> 5); w < total; w += stride) {
    const int64_t n = n_first + w / Q, q = w % Q;
    const float* t = T + q * D;
    const scalar_t* g = G + n * D;
    float gs = 0.f;
    for (int64_t d = lane; d < D; d += 32) gs = fmaf(to_float(g[d]), __ldg(t + d), gs);
    gs = warp_sum(gs);
    float score = gs;
    if (MODE != Mode::Global) {
      float mx = -INFINITY, esum = 0.f, wsum = 0.f;
      for (int64_t j = 0; j < K; ++j) {
        const scalar_t* c = C + (n * K + j) * D;
        float cs = 0.f, cg = 0.f;
        for (int64_t d = lane; d < D; d += 32) {
          const float cv = to_float(c[d]);
          cs = fmaf(cv, __ldg(t + d), cs);
          if (MODE == Mode::Image) cg = fmaf(cv, to_float(g[d]), cg);
        }
        cs = warp_sum(cs);
        if (MODE == Mode::Image) cg = warp_sum(cg);
        softmax_step(MODE == Mode::Text ? cs : cg, cs, inv_tau, mx, esum, wsum);
      }
      score = alpha * gs + (1.f - alpha) * (wsum / esum);
    }
    if (lane == 0) out.put(q, n, score);
  }
}

// --------------------------------------------------------------------------------------------- small kernel
constexpr int kSmallThreads = 256;
constexpr int kGroup = 8;  // lanes per image
constexpr int kSmallImagesPerBlock = kSmallThreads / kGroup;

// 16 bytes of rows as floats: 8 values of a 2-byte type, 4 of float32.
template <typename scalar_t>
struct Pack {
  static constexpr int kValues = 16 / sizeof(scalar_t);
  float v[kValues];
};

template <typename scalar_t>
__device__ __forceinline__ Pack<scalar_t> load_pack(const scalar_t* p) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  Pack<scalar_t> out;
  if constexpr (sizeof(scalar_t) == 4) {
    out.v[0] = __uint_as_float(raw.x);
    out.v[1] = __uint_as_float(raw.y);
    out.v[2] = __uint_as_float(raw.z);
    out.v[3] = __uint_as_float(raw.w);
  } else {
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float2 f;
      if constexpr (std::is_same_v<scalar_t, at::Half>) {
        f = __half22float2(*reinterpret_cast<const __half2*>(&words[i]));
      } else {
        f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&words[i]));
      }
      out.v[2 * i] = f.x;
      out.v[2 * i + 1] = f.y;
    }
  }
  return out;
}

template <typename scalar_t>
__device__ __forceinline__ float dot_pack(const Pack<scalar_t>& a, const float* t) {
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < Pack<scalar_t>::kValues; ++i) s = fmaf(a.v[i], t[i], s);
  return s;
}

template <typename scalar_t>
__device__ __forceinline__ float dot_packs(const Pack<scalar_t>& a, const Pack<scalar_t>& b) {
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < Pack<scalar_t>::kValues; ++i) s = fmaf(a.v[i], b.v[i], s);
  return s;
}

__device__ __forceinline__ float group_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 4);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v;
}

// QT queries per pass (block row blockIdx.y picks queries [q0, q0 + QT)), 8 lanes per image.
template <typename scalar_t, Mode MODE, int QT>
__global__ void __launch_bounds__(kSmallThreads)
    small_kernel(const float* __restrict__ T, const scalar_t* __restrict__ G, const scalar_t* __restrict__ C,
                 int64_t Q, int64_t K, int64_t D, float alpha, float inv_tau, int64_t n_first, int64_t n_count,
                 Output out) {
  extern __shared__ float shared_t[];  // [QT, D] fp32, zero rows past Q
  const int64_t q0 = static_cast<int64_t>(blockIdx.y) * QT;
  for (int64_t i = threadIdx.x; i < QT * D; i += blockDim.x) {
    const int64_t q = q0 + i / D;
    shared_t[i] = q < Q ? T[q * D + i % D] : 0.f;
  }
  __syncthreads();

  constexpr int V = Pack<scalar_t>::kValues;
  const int sub = threadIdx.x % kGroup;
  const int64_t packs = D / V;
  const int64_t images_per_grid = static_cast<int64_t>(gridDim.x) * kSmallImagesPerBlock;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kSmallImagesPerBlock; base < n_count;
       base += images_per_grid) {
    const int64_t local = base + threadIdx.x / kGroup;
    const bool valid = local < n_count;  // every lane runs the shuffles; only valid images are written
    const int64_t n = n_first + (valid ? local : 0);
    const scalar_t* g = G + n * D;

    float gs[QT];
#pragma unroll
    for (int i = 0; i < QT; ++i) gs[i] = 0.f;
#pragma unroll 4
    for (int64_t p = sub; p < packs; p += kGroup) {
      const Pack<scalar_t> gv = load_pack(g + p * V);
#pragma unroll
      for (int i = 0; i < QT; ++i) gs[i] += dot_pack(gv, shared_t + i * D + p * V);
    }
#pragma unroll
    for (int i = 0; i < QT; ++i) gs[i] = group_sum(gs[i]);

    float score[QT];
    if constexpr (MODE == Mode::Global) {
#pragma unroll
      for (int i = 0; i < QT; ++i) score[i] = gs[i];
    } else {
      float mx[QT], esum[QT], wsum[QT];
#pragma unroll
      for (int i = 0; i < QT; ++i) {
        mx[i] = -INFINITY;
        esum[i] = 0.f;
        wsum[i] = 0.f;
      }
      for (int64_t j = 0; j < K; ++j) {
        const scalar_t* c = C + (n * K + j) * D;
        float cs[QT];
#pragma unroll
        for (int i = 0; i < QT; ++i) cs[i] = 0.f;
        float cg = 0.f;
#pragma unroll 4
        for (int64_t p = sub; p < packs; p += kGroup) {
          const Pack<scalar_t> cv = load_pack(c + p * V);
#pragma unroll
          for (int i = 0; i < QT; ++i) cs[i] += dot_pack(cv, shared_t + i * D + p * V);
          if constexpr (MODE == Mode::Image) cg += dot_packs(cv, load_pack(g + p * V));
        }
#pragma unroll
        for (int i = 0; i < QT; ++i) cs[i] = group_sum(cs[i]);
        if constexpr (MODE == Mode::Image) cg = group_sum(cg);
#pragma unroll
        for (int i = 0; i < QT; ++i) softmax_step(MODE == Mode::Text ? cs[i] : cg, cs[i], inv_tau, mx[i], esum[i],
                                                  wsum[i]);
      }
#pragma unroll
      for (int i = 0; i < QT; ++i) score[i] = alpha * gs[i] + (1.f - alpha) * (wsum[i] / esum[i]);
    }
    // lane `sub` of the group writes query q0 + sub (and q0 + sub + 8... never: QT <= 8)
#pragma unroll
    for (int i = 0; i < QT; ++i)
      if (valid && i == sub && q0 + i < Q) out.put(q0 + i, n, score[i]);
  }
}

// -------------------------------------------------------------------------------------------- tensor kernel
constexpr int kTile = 16;          // WMMA tile edge: 16 rows (images or crops) x 16 queries x 16 dims
constexpr int kMaxTensorWarps = 8;
constexpr int kPrefetch = 8;       // row fragments a warp has in flight (8 x 512 bytes per warp)

template <typename V>
__device__ __forceinline__ V zero_value();
template <>
__device__ __forceinline__ __half zero_value<__half>() { return __ushort_as_half(0); }
template <>
__device__ __forceinline__ __nv_bfloat16 zero_value<__nv_bfloat16>() { return __ushort_as_bfloat16(0); }

template <typename scalar_t>
struct Wmma;
template <>
struct Wmma<at::Half> {
  using type = __half;
};
template <>
struct Wmma<at::BFloat16> {
  using type = __nv_bfloat16;
};

// Row tiles per group of 16 images: the global rows, then (unless Global) the images' 16 K crop rows.
__host__ __device__ __forceinline__ int64_t rows_per_image_tile(Mode mode, int64_t K) {
  return mode == Mode::Global ? 1 : 1 + K;
}

// Image tiles a block scores per step, so that a step has close to kMaxTensorWarps row tiles (one per warp).
__host__ __device__ __forceinline__ int64_t image_tiles_per_step(Mode mode, int64_t K) {
  return std::max<int64_t>(1, kMaxTensorWarps / rows_per_image_tile(mode, K));
}

// Persistent blocks: each loads its 16 CT queries [q0, q0 + 16 CT) into shared memory once (row stride D + 16, so
// the fragment loads do not all hit one bank), then steps over groups of image tiles. Each warp multiplies one
// 16-row tile of rows (read once from global memory, kPrefetch fragments in flight) by every query tile,
// accumulating in fp32; the products land in shared memory, where the epilogue fuses the K-softmax.
// Queries are in the rows' dtype (the operator's contract), so the products are exact.
template <typename scalar_t, Mode MODE, int CT>
__global__ void __launch_bounds__(kMaxTensorWarps * 32)
    tensor_kernel(const scalar_t* __restrict__ T, const scalar_t* __restrict__ G, const scalar_t* __restrict__ C,
                  int64_t Q, int64_t K, int64_t D, float alpha, float inv_tau, int64_t n_first, int64_t tiles,
                  Output out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  using V = typename Wmma<scalar_t>::type;
  constexpr int kCols = kTile * CT;
  extern __shared__ __align__(32) unsigned char shared_raw[];
  const int64_t ldt = D + kTile;
  V* tq = reinterpret_cast<V*>(shared_raw);                               // [kCols, D + 16]
  float* sims = reinterpret_cast<float*>(shared_raw + kCols * ldt * sizeof(V));  // [step rows, kCols]
  const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int64_t q0 = static_cast<int64_t>(blockIdx.y) * kCols;
  const V* tg = reinterpret_cast<const V*>(T);
  for (int64_t i = threadIdx.x; i < kCols * D; i += blockDim.x) {
    const int64_t col = i / D, d = i % D;
    tq[col * ldt + d] = q0 + col < Q ? tg[(q0 + col) * D + d] : zero_value<V>();
  }
  __syncthreads();

  const int64_t rpt = rows_per_image_tile(MODE, K), per_step = image_tiles_per_step(MODE, K);
  const int64_t step_rows = per_step * rpt;
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * per_step; first < tiles;
       first += static_cast<int64_t>(gridDim.x) * per_step) {
    for (int64_t rt = warp; rt < step_rows; rt += warps) {
      const int64_t tile = first + rt / rpt, r = rt % rpt;
      if (tile >= tiles) continue;
      const int64_t n0 = n_first + tile * kTile;
      const V* rows = r == 0 ? reinterpret_cast<const V*>(G) + n0 * D
                             : reinterpret_cast<const V*>(C) + (n0 * K + (r - 1) * kTile) * D;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[CT];
#pragma unroll
      for (int ct = 0; ct < CT; ++ct) wmma::fill_fragment(acc[ct], 0.f);
      int64_t d = 0;
      for (; d + kPrefetch * kTile <= D; d += kPrefetch * kTile) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, V, wmma::row_major> a[kPrefetch];
#pragma unroll
        for (int s = 0; s < kPrefetch; ++s) wmma::load_matrix_sync(a[s], rows + d + s * kTile, static_cast<unsigned>(D));
#pragma unroll
        for (int s = 0; s < kPrefetch; ++s) {
#pragma unroll
          for (int ct = 0; ct < CT; ++ct) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, V, wmma::col_major> b;
            wmma::load_matrix_sync(b, tq + ct * kTile * ldt + d + s * kTile, static_cast<unsigned>(ldt));
            wmma::mma_sync(acc[ct], a[s], b, acc[ct]);
          }
        }
      }
      for (; d < D; d += kTile) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, V, wmma::row_major> a;
        wmma::load_matrix_sync(a, rows + d, static_cast<unsigned>(D));
#pragma unroll
        for (int ct = 0; ct < CT; ++ct) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, V, wmma::col_major> b;
          wmma::load_matrix_sync(b, tq + ct * kTile * ldt + d, static_cast<unsigned>(ldt));
          wmma::mma_sync(acc[ct], a, b, acc[ct]);
        }
      }
#pragma unroll
      for (int ct = 0; ct < CT; ++ct)
        wmma::store_matrix_sync(sims + rt * kTile * kCols + ct * kTile, acc[ct], kCols, wmma::mem_row_major);
    }
    __syncthreads();
    // epilogue: image i of the step (tile i / 16) and query column col
    for (int64_t pair = threadIdx.x; pair < per_step * kTile * kCols; pair += blockDim.x) {
      const int64_t i = pair / kCols, col = pair % kCols, tile = first + i / kTile, image = i % kTile;
      if (tile >= tiles || q0 + col >= Q) continue;
      const float* base = sims + (i / kTile) * rpt * kTile * kCols;
      const float gs = base[image * kCols + col];
      float score = gs;
      if (MODE == Mode::Text) {
        float mx = -INFINITY, esum = 0.f, wsum = 0.f;
        for (int64_t j = 0; j < K; ++j) {
          const float cs = base[(kTile + image * K + j) * kCols + col];
          softmax_step(cs, cs, inv_tau, mx, esum, wsum);
        }
        score = alpha * gs + (1.f - alpha) * (wsum / esum);
      }
      out.put(q0 + col, n_first + tile * kTile + image, score);
    }
    __syncthreads();  // sims is rewritten by the next step
  }
#endif
}

// ------------------------------------------------------------------------------------------------ dispatch

// The queries of one call as fp32 rows (the CUDA-core kernels read them so); the tensor kernel reads the operator's
// own T, which is in the rows' dtype.
struct Queries {
  at::Tensor f32, native;
};

constexpr int64_t kTensorMinQueries = 9;
constexpr int64_t kPassQueries = 4096;
constexpr int64_t kSharedDefault = 48 * 1024;

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
bool aligned32(const void* p) { return reinterpret_cast<uintptr_t>(p) % 32 == 0; }

int max_shared_bytes() {
  int device = 0, bytes = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return bytes;
}

template <typename Kernel>
bool allow_shared(Kernel kernel, int64_t bytes) {
  if (bytes <= kSharedDefault) return true;
  if (bytes > max_shared_bytes()) return false;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  return true;
}

unsigned grid_for(int64_t units, int64_t per_block) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((units + per_block - 1) / per_block, 1 << 20)));
}

template <typename scalar_t, Mode MODE>
void launch_generic(const Queries& qs, const at::Tensor& G, const at::Tensor& C, float alpha, float inv_tau,
                    int64_t q0, int64_t qn, int64_t n_first, int64_t n_count, Output out, cudaStream_t stream) {
  const int64_t D = G.size(1), K = C.size(1);
  generic_kernel<scalar_t, MODE><<<grid_for(n_count * qn, kGenericWarps), kGenericThreads, 0, stream>>>(
      qs.f32.data_ptr<float>() + q0 * D, G.data_ptr<scalar_t>(), C.data_ptr<scalar_t>(), qn, K, D, alpha, inv_tau,
      n_first, n_count, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, Mode MODE, int QT>
bool launch_small(const Queries& qs, const at::Tensor& G, const at::Tensor& C, float alpha, float inv_tau,
                  int64_t q0, int64_t qn, int64_t n_first, int64_t n_count, Output out, cudaStream_t stream) {
  const int64_t D = G.size(1), K = C.size(1);
  const int64_t bytes = QT * D * static_cast<int64_t>(sizeof(float));
  auto kernel = small_kernel<scalar_t, MODE, QT>;
  if (!allow_shared(kernel, bytes)) return false;
  const dim3 grid(grid_for(n_count, kSmallImagesPerBlock), static_cast<unsigned>((qn + QT - 1) / QT));
  kernel<<<grid, kSmallThreads, bytes, stream>>>(qs.f32.data_ptr<float>() + q0 * D, G.data_ptr<scalar_t>(),
                                                 C.data_ptr<scalar_t>(), qn, K, D, alpha, inv_tau, n_first,
                                                 n_count, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

int multiprocessors() {
  int device = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

template <typename scalar_t, Mode MODE, int CT>
bool launch_tensor(const Queries& qs, const at::Tensor& G, const at::Tensor& C, float alpha, float inv_tau,
                   int64_t q0, int64_t qn, int64_t n_first, int64_t tiles, Output out, cudaStream_t stream) {
  const int64_t D = G.size(1), K = C.size(1);
  const int64_t per_step = image_tiles_per_step(MODE, K), step_rows = per_step * rows_per_image_tile(MODE, K);
  const int64_t bytes = kTile * CT * (D + kTile) * static_cast<int64_t>(sizeof(scalar_t)) +
                        step_rows * kTile * kTile * CT * static_cast<int64_t>(sizeof(float));
  auto kernel = tensor_kernel<scalar_t, MODE, CT>;
  if (!allow_shared(kernel, bytes)) return false;
  const int warps = static_cast<int>(std::min<int64_t>(kMaxTensorWarps, step_rows));
  const int64_t steps = (tiles + per_step - 1) / per_step;
  const int64_t resident = 2 * static_cast<int64_t>(multiprocessors()) * std::max<int64_t>(1, 200 * 1024 / bytes);
  const dim3 grid(static_cast<unsigned>(std::max<int64_t>(1, std::min(steps, resident))),
                  static_cast<unsigned>((qn + kTile * CT - 1) / (kTile * CT)));
  kernel<<<grid, warps * 32, bytes, stream>>>(qs.native.data_ptr<scalar_t>() + q0 * D, G.data_ptr<scalar_t>(),
                                               C.data_ptr<scalar_t>(), qn, K, D, alpha, inv_tau, n_first, tiles, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

// Queries [q0, q0 + qn) x images [n0, n0 + nn), written relative to `out`: the tensor kernel takes whole tiles of
// 16 images when it applies, the small or generic kernel the rest.
template <typename scalar_t, Mode MODE>
void launch_mode(const Queries& qs, const at::Tensor& G, const at::Tensor& C, float alpha, float inv_tau,
                 int64_t q0, int64_t qn, int64_t n0, int64_t nn, Output out) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t D = G.size(1);
  const void* c_ptr = C.data_ptr();
  const bool rows_aligned16 = (D * static_cast<int64_t>(sizeof(scalar_t))) % 16 == 0 && aligned16(G.data_ptr()) &&
                              (MODE == Mode::Global || aligned16(c_ptr));
  if constexpr (!std::is_same_v<scalar_t, float> && MODE != Mode::Image) {
    const bool rows_aligned32 = D % kTile == 0 && aligned32(G.data_ptr()) && (MODE == Mode::Global || aligned32(c_ptr));
    const int64_t tiles = nn / kTile;
    if (qn >= kTensorMinQueries && rows_aligned32 && tiles > 0) {
      const bool launched = qn <= 16   ? launch_tensor<scalar_t, MODE, 1>(qs, G, C, alpha, inv_tau, q0, qn, n0, tiles, out, stream)
                            : qn <= 32 ? launch_tensor<scalar_t, MODE, 2>(qs, G, C, alpha, inv_tau, q0, qn, n0, tiles, out, stream)
                                       : launch_tensor<scalar_t, MODE, 4>(qs, G, C, alpha, inv_tau, q0, qn, n0, tiles, out, stream);
      if (launched) {
        n0 += tiles * kTile;
        nn -= tiles * kTile;
        if (nn == 0) return;
      }
    }
  }
  if (rows_aligned16) {
    const bool launched = qn == 1   ? launch_small<scalar_t, MODE, 1>(qs, G, C, alpha, inv_tau, q0, qn, n0, nn, out, stream)
                          : qn <= 4 ? launch_small<scalar_t, MODE, 4>(qs, G, C, alpha, inv_tau, q0, qn, n0, nn, out, stream)
                                    : launch_small<scalar_t, MODE, 8>(qs, G, C, alpha, inv_tau, q0, qn, n0, nn, out, stream);
    if (launched) return;
  }
  launch_generic<scalar_t, MODE>(qs, G, C, alpha, inv_tau, q0, qn, n0, nn, out, stream);
}

template <typename scalar_t>
void launch_typed(const Queries& qs, const at::Tensor& G, const at::Tensor& C, float alpha, float inv_tau,
                  bool text, int64_t q0, int64_t qn, int64_t n0, int64_t nn, Output out) {
  if (alpha == 1.f)
    launch_mode<scalar_t, Mode::Global>(qs, G, C, alpha, inv_tau, q0, qn, n0, nn, out);
  else if (text)
    launch_mode<scalar_t, Mode::Text>(qs, G, C, alpha, inv_tau, q0, qn, n0, nn, out);
  else
    launch_mode<scalar_t, Mode::Image>(qs, G, C, alpha, inv_tau, q0, qn, n0, nn, out);
}

Queries make_queries(const at::Tensor& T) {
  return {T.to(at::kFloat).contiguous(), T.contiguous()};
}

void launch_scores(const Queries& qs, const at::Tensor& G, const at::Tensor& C, double alpha, double tau,
                   bool text, int64_t q0, int64_t qn, int64_t n0, int64_t nn, Output out) {
  const float inv_tau =
      static_cast<float>(std::min<double>(1.0 / tau, static_cast<double>(std::numeric_limits<float>::max())));
  const float a = static_cast<float>(alpha);
  // passes of at most kPassQueries keep every grid's query dimension far below CUDA's 65535 limit
  for (int64_t done = 0; done < qn; done += kPassQueries) {
    const int64_t count = std::min(kPassQueries, qn - done);
    Output pass = out;
    pass.row0 = out.row0 + done;
    switch (G.scalar_type()) {
      case at::kHalf:
        launch_typed<at::Half>(qs, G, C, a, inv_tau, text, q0 + done, count, n0, nn, pass);
        break;
      case at::kBFloat16:
        launch_typed<at::BFloat16>(qs, G, C, a, inv_tau, text, q0 + done, count, n0, nn, pass);
        break;
      default:
        launch_typed<float>(qs, G, C, a, inv_tau, text, q0 + done, count, n0, nn, pass);
    }
  }
}

}  // namespace

at::Tensor scores_cuda(const at::Tensor& T, const at::Tensor& G, const at::Tensor& C, double alpha, double tau,
                       bool weights_is_text) {
  const c10::cuda::CUDAGuard guard(T.device());
  const Queries qs = make_queries(T);
  const int64_t Q = T.size(0), N = G.size(0);
  at::Tensor out = at::empty({Q, N}, T.options().dtype(at::kFloat));
  launch_scores(qs, G, C, alpha, tau, weights_is_text, 0, Q, 0, N, Output{out.data_ptr<float>(), nullptr, 0, N, 0});
  return out;
}

std::tuple<at::Tensor, at::Tensor> topk_cuda(const at::Tensor& T, const at::Tensor& G, const at::Tensor& C,
                                             int64_t k, double alpha, double tau, bool weights_is_text) {
  const c10::cuda::CUDAGuard guard(T.device());
  const Queries qs = make_queries(T);
  const int64_t Q = T.size(0), N = G.size(0);
  const TopkPlan plan = plan_topk_chunks(Q, N, k);
  return chunked_topk(Q, N, k, plan, T.options(),
                      [&](int64_t q0, int64_t q_count, int64_t n0, int64_t n_count, at::Tensor& keys) {
                        launch_scores(qs, G, C, alpha, tau, weights_is_text, q0, q_count, n0, n_count,
                                      Output{nullptr, keys.data_ptr<int64_t>(), n0, n_count, 0});
                      });
}

}  // namespace laclip
