// LACLIP fused scoring on the CPU.
//
// Work is split into chunks (a range of queries x a range of images), one per thread. A chunk walks its images
// in tiles of a few dozen images (~0.5 MiB of fp32 rows, so a tile stays in L2) and, for each group of queries,
// computes all dot products of the group against the tile's rows with a register-blocked micro-kernel
// (6 queries x 4 rows, D innermost), then a per-(query, image) epilogue: the K-softmax and weighted sum
// ("text" weights) or nothing at all ("image" weights: each image's pooled vector
// p = alpha g + (1 - alpha) sum_j w_j c_j is built once per tile, so the score is the single dot p . t).
// fp16 and bf16 rows are converted to fp32 once per tile, except bf16 rows with "text" weights on CPUs with the
// AVX-512 BF16 dot-product instruction (vdpbf16ps), whose micro-kernel reads bf16 queries and rows directly
// (products exact, fp32 accumulation): half the bytes and twice the multiply-adds per instruction of fp32.
// On CPUs with AMX (Sapphire Rapids and later) those bf16 dot products run on the tile unit instead: each query
// group is packed once into AMX's pair-interleaved layout, then 16 rows x 16 queries tiles accumulate 32 dims
// per instruction (1 TFLOP/s on one core measured, 4.6x that core's fp32 GEMM) and are transposed back.
// Top-k keeps one heap of k entries per (query, image range); heaps are merged at the end, so neither
// [Q, N, K] nor [Q, N] is ever stored.
//
// The hot loops have five implementations (csrc/cpu/, one file per instruction set, sharing the kernel table of
// csrc/cpu/kernels.h), chosen at run time (cpu_isa): portable loops the compiler
// vectorises at -O3 (baseline x86-64: SSE2), AVX2+FMA intrinsics (4-query x 3-row micro-kernel), AVX-512F
// intrinsics (6 x 4), AVX-512F plus the BF16 micro-kernel, and that plus AMX tiles for bf16 "text" dots
// (Linux, once the kernel grants the process the tile state). All accumulate in fp32.
#include "laclip.h"
#include "cpu/kernels.h"

#include <ATen/ops/empty.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

namespace laclip {
namespace {

using cpu::idx_t;
using cpu::Kernels;
using cpu::kAmxDims;
using cpu::packed_bf16_size;

constexpr idx_t kQueryGroup = 64;      // queries whose dot products are held at once per tile
constexpr idx_t kTileBytes = 512 << 10;  // fp32 bytes of image rows (global + crops) per tile

// The CPU paths, slowest first (kPathNames); null for a path this CPU cannot run.
constexpr int kPaths = 5;
const char* const kPathNames[kPaths] = {"generic", "avx2", "avx512", "avx512_bf16", "amx_bf16"};

const Kernels* path_kernels(int path) {
  switch (path) {
    case 0: return cpu::generic_kernels();
    case 1: return cpu::avx2_kernels();
    case 2: return cpu::avx512_kernels();
    case 3: return cpu::avx512_bf16_kernels();
    case 4: return cpu::amx_bf16_kernels();
    default: return nullptr;
  }
}

std::atomic<int> g_max_path{kPaths - 1};

const Kernels& kernels() {
  for (int path = g_max_path.load(); path > 0; --path)
    if (const Kernels* k = path_kernels(path)) return *k;
  return *cpu::generic_kernels();
}

// ------------------------------------------------------------------------------------------------------------
// Top-k heaps: root = worst entry (lowest score; on equal scores, highest index).
// ------------------------------------------------------------------------------------------------------------
inline bool worse(float a, idx_t ia, float b, idx_t ib) { return a < b || (a == b && ia > ib); }

struct Heaps {  // one heap of capacity k per query
  idx_t k = 0;
  std::vector<float> val;
  std::vector<idx_t> idx;
  std::vector<idx_t> size;
  Heaps(idx_t Q, idx_t k_) : k(k_), val(Q * k_), idx(Q * k_), size(Q, 0) {}

  void push(idx_t q, float s, idx_t id) {
    float* v = val.data() + q * k;
    idx_t* ix = idx.data() + q * k;
    idx_t& n = size[q];
    if (n < k) {
      idx_t pos = n++;
      while (pos > 0) {
        const idx_t parent = (pos - 1) / 2;
        if (!worse(s, id, v[parent], ix[parent])) break;
        v[pos] = v[parent];
        ix[pos] = ix[parent];
        pos = parent;
      }
      v[pos] = s;
      ix[pos] = id;
      return;
    }
    if (!worse(v[0], ix[0], s, id)) return;
    idx_t pos = 0;
    for (;;) {
      const idx_t l = 2 * pos + 1;
      if (l >= n) break;
      idx_t ch = l;
      if (l + 1 < n && worse(v[l + 1], ix[l + 1], v[l], ix[l])) ch = l + 1;
      if (!worse(v[ch], ix[ch], s, id)) break;
      v[pos] = v[ch];
      ix[pos] = ix[ch];
      pos = ch;
    }
    v[pos] = s;
    ix[pos] = id;
  }

  // Scores of images first_id, first_id + 1, ... (ids rise, so a score equal to the root's never enters).
  void push_row(idx_t q, const float* s, idx_t count, idx_t first_id) {
    const float* root = val.data() + q * k;
    for (idx_t i = 0; i < count; ++i) {
      if (size[q] == k && !(s[i] > root[0])) continue;
      push(q, s[i], first_id + i);
    }
  }
};

// ------------------------------------------------------------------------------------------------------------
// Driver
// ------------------------------------------------------------------------------------------------------------
struct Problem {
  const float* T = nullptr;  // [Q, D] fp32
  const float* Gf = nullptr;
  const float* Cf = nullptr;  // fp32 rows, or
  const c10::Half* Gh = nullptr;
  const c10::Half* Ch = nullptr;  // fp16 rows, or
  const c10::BFloat16* Tb = nullptr;
  const c10::BFloat16* Gb = nullptr;
  const c10::BFloat16* Cb = nullptr;  // bf16 queries and rows
  idx_t Q = 0, N = 0, K = 0, D = 0;
  float alpha = 0.f, inv_tau = 1.f;
  bool text = false;
};

idx_t tile_images(idx_t K, idx_t D) {
  const idx_t per_image = (K + 1) * D * static_cast<idx_t>(sizeof(float));
  idx_t t = std::max<idx_t>(1, kTileBytes / per_image);
  if (t >= 32) t = t / 16 * 16;
  return std::min<idx_t>(t, 512);
}

// One chunk: queries [qa, qb) x images [na, nb). Writes scores rows (scores != nullptr) or pushes into heaps.
void run_chunk(const Problem& P, const Kernels& kern, idx_t qa, idx_t qb, idx_t na, idx_t nb, idx_t tile,
               float* scores, Heaps* heaps) {
  const idx_t K = P.K, D = P.D;
  const bool bf16_dots = P.text && P.Gb != nullptr && kern.dots_bf16 != nullptr;  // no conversion at all
  const bool convert = (P.Gh != nullptr || P.Gb != nullptr) && !bf16_dots;
  std::vector<float> gbuf(convert ? tile * D : 0), cbuf(convert ? tile * K * D : 0);
  std::vector<float> pbuf(P.text ? 0 : tile * D), wbuf(K);
  const idx_t qg = std::min(kQueryGroup, qb - qa);
  std::vector<float> sg(qg * tile), sc(P.text ? qg * tile * K : 0), row(tile);
  // AMX: every query group of the chunk packed once, before the tiles that reuse it
  const bool packed_dots = bf16_dots && kern.dots_packed_bf16 != nullptr && D % kAmxDims == 0;
  std::vector<std::vector<c10::BFloat16>> packed;
  for (idx_t q0 = qa; packed_dots && q0 < qb; q0 += qg) {
    const idx_t nq = std::min(qg, qb - q0);
    packed.emplace_back(packed_bf16_size(nq, D));
    kern.pack_bf16(P.Tb + q0 * D, D, nq, D, packed.back().data());
  }

  for (idx_t n0 = na; n0 < nb; n0 += tile) {
    const idx_t nt = std::min(tile, nb - n0);
    const float* g = P.Gf ? P.Gf + n0 * D : gbuf.data();
    const float* c = P.Cf ? P.Cf + n0 * K * D : cbuf.data();
    if (convert && P.Gh) {
      kern.half_to_float(P.Gh + n0 * D, gbuf.data(), nt * D);
      kern.half_to_float(P.Ch + n0 * K * D, cbuf.data(), nt * K * D);
    } else if (convert) {
      kern.bf16_to_float(P.Gb + n0 * D, gbuf.data(), nt * D);
      kern.bf16_to_float(P.Cb + n0 * K * D, cbuf.data(), nt * K * D);
    }
    if (!P.text) {
      for (idx_t i = 0; i < nt; ++i)
        kern.pool(g + i * D, c + i * K * D, K, D, P.alpha, P.inv_tau, wbuf.data(), pbuf.data() + i * D);
    }
    for (idx_t q0 = qa; q0 < qb; q0 += qg) {
      const idx_t nq = std::min(qg, qb - q0);
      const float* t = P.T + q0 * D;
      if (packed_dots) {
        const c10::BFloat16* tp = packed[(q0 - qa) / qg].data();
        kern.dots_packed_bf16(tp, nq, P.Gb + n0 * D, D, nt, D, sg.data(), nt);
        kern.dots_packed_bf16(tp, nq, P.Cb + n0 * K * D, D, nt * K, D, sc.data(), nt * K);
      } else if (bf16_dots) {
        const c10::BFloat16* tb = P.Tb + q0 * D;
        kern.dots_bf16(tb, D, nq, P.Gb + n0 * D, D, nt, D, sg.data(), nt);
        kern.dots_bf16(tb, D, nq, P.Cb + n0 * K * D, D, nt * K, D, sc.data(), nt * K);
      } else if (P.text) {
        kern.dots(t, D, nq, g, D, nt, D, sg.data(), nt);
        kern.dots(t, D, nq, c, D, nt * K, D, sc.data(), nt * K);
      }
      if (P.text) {
        for (idx_t i = 0; i < nq; ++i) {
          float* dst = scores ? scores + (q0 + i) * P.N + n0 : row.data();
          kern.text_epilogue(sg.data() + i * nt, sc.data() + i * nt * K, nt, K, P.alpha, P.inv_tau, dst);
          if (heaps) heaps->push_row(q0 + i, dst, nt, n0);
        }
      } else if (scores) {
        kern.dots(t, D, nq, pbuf.data(), D, nt, D, scores + q0 * P.N + n0, P.N);
      } else {
        kern.dots(t, D, nq, pbuf.data(), D, nt, D, sg.data(), nt);
        for (idx_t i = 0; i < nq; ++i) heaps->push_row(q0 + i, sg.data() + i * nt, nt, n0);
      }
    }
  }
}

struct Plan {
  idx_t tile, ntiles, nsplit, qsplit;
  idx_t n_begin(idx_t s, idx_t N) const { return std::min(N, (ntiles * s / nsplit) * tile); }
  idx_t q_begin(idx_t s, idx_t Q) const {
    // split queries on multiples of the micro-kernel's 6-query block where possible
    const idx_t blocks = (Q + 5) / 6;
    return std::min(Q, (blocks * s / qsplit) * 6);
  }
};

Plan make_plan(const Problem& P) {
  Plan plan;
  plan.tile = tile_images(P.K, P.D);
  plan.ntiles = (P.N + plan.tile - 1) / plan.tile;
  const idx_t threads = std::max<idx_t>(1, at::get_num_threads());
  plan.nsplit = std::min(threads, plan.ntiles);
  plan.qsplit = std::max<idx_t>(1, std::min(threads / plan.nsplit, (P.Q + 5) / 6));
  return plan;
}

// T, G, C: contiguous, one dtype; Tf: T as contiguous fp32.
Problem make_problem(const at::Tensor& T, const at::Tensor& Tf, const at::Tensor& G, const at::Tensor& C,
                     double alpha, double tau, bool text) {
  Problem P;
  P.T = Tf.data_ptr<float>();
  switch (G.scalar_type()) {
    case at::kHalf:
      P.Gh = G.data_ptr<at::Half>();
      P.Ch = C.data_ptr<at::Half>();
      break;
    case at::kBFloat16:
      P.Tb = T.data_ptr<at::BFloat16>();
      P.Gb = G.data_ptr<at::BFloat16>();
      P.Cb = C.data_ptr<at::BFloat16>();
      break;
    default:
      P.Gf = G.data_ptr<float>();
      P.Cf = C.data_ptr<float>();
  }
  P.Q = Tf.size(0);
  P.D = Tf.size(1);
  P.N = G.size(0);
  P.K = C.size(1);
  P.alpha = static_cast<float>(alpha);
  const double inv_tau = 1.0 / tau;
  P.inv_tau = static_cast<float>(std::min<double>(inv_tau, std::numeric_limits<float>::max()));
  P.text = text;
  return P;
}

}  // namespace

const char* cpu_isa() { return kernels().name; }

std::vector<std::string> cpu_isas() {
  std::vector<std::string> names;
  for (int path = 0; path < kPaths; ++path)
    if (path_kernels(path) != nullptr) names.emplace_back(kPathNames[path]);
  return names;
}

void set_max_isa(const std::string& name) {
  if (name.empty()) {
    g_max_path.store(kPaths - 1);
    return;
  }
  const auto* found = std::find(kPathNames, kPathNames + kPaths, name);
  TORCH_CHECK_VALUE(found != kPathNames + kPaths, "laclip: unknown CPU path '", name,
                    "'; expected generic, avx2, avx512, avx512_bf16 or amx_bf16");
  g_max_path.store(static_cast<int>(found - kPathNames));
}

at::Tensor scores_cpu(const at::Tensor& T, const at::Tensor& G, const at::Tensor& C, double alpha, double tau,
                      bool weights_is_text) {
  const at::Tensor Tf = T.to(at::kFloat).contiguous();
  const Problem P = make_problem(T, Tf, G, C, alpha, tau, weights_is_text);
  const Kernels& kern = kernels();
  const Plan plan = make_plan(P);
  at::Tensor out = at::empty({P.Q, P.N}, T.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  at::parallel_for(0, plan.nsplit * plan.qsplit, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const idx_t ns = c / plan.qsplit, qs = c % plan.qsplit;
      run_chunk(P, kern, plan.q_begin(qs, P.Q), plan.q_begin(qs + 1, P.Q), plan.n_begin(ns, P.N),
                plan.n_begin(ns + 1, P.N), plan.tile, o, nullptr);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> topk_cpu(const at::Tensor& T, const at::Tensor& G, const at::Tensor& C,
                                            int64_t k, double alpha, double tau, bool weights_is_text) {
  const at::Tensor Tf = T.to(at::kFloat).contiguous();
  const Problem P = make_problem(T, Tf, G, C, alpha, tau, weights_is_text);
  const Kernels& kern = kernels();
  const Plan plan = make_plan(P);
  std::vector<Heaps> heaps;
  heaps.reserve(plan.nsplit);
  for (idx_t s = 0; s < plan.nsplit; ++s) heaps.emplace_back(P.Q, k);
  at::parallel_for(0, plan.nsplit * plan.qsplit, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const idx_t ns = c / plan.qsplit, qs = c % plan.qsplit;
      run_chunk(P, kern, plan.q_begin(qs, P.Q), plan.q_begin(qs + 1, P.Q), plan.n_begin(ns, P.N),
                plan.n_begin(ns + 1, P.N), plan.tile, nullptr, &heaps[ns]);
    }
  });

  at::Tensor values = at::empty({P.Q, k}, T.options().dtype(at::kFloat));
  at::Tensor indices = at::empty({P.Q, k}, T.options().dtype(at::kLong));
  float* vo = values.data_ptr<float>();
  int64_t* io = indices.data_ptr<int64_t>();
  at::parallel_for(0, P.Q, 1, [&](int64_t begin, int64_t end) {
    std::vector<std::pair<float, idx_t>> all;
    for (int64_t q = begin; q < end; ++q) {
      all.clear();
      for (const Heaps& h : heaps)
        for (idx_t i = 0; i < h.size[q]; ++i) all.emplace_back(h.val[q * k + i], h.idx[q * k + i]);
      const idx_t take = std::min<idx_t>(k, static_cast<idx_t>(all.size()));
      std::partial_sort(all.begin(), all.begin() + take, all.end(), [](const auto& a, const auto& b) {
        return worse(b.first, b.second, a.first, a.second);
      });
      for (idx_t i = 0; i < take; ++i) {
        vo[q * k + i] = all[i].first;
        io[q * k + i] = all[i].second;
      }
    }
  });
  return {values, indices};
}

}  // namespace laclip
