// int8 linear layers for CPU inference at small batch: weights int8 per output channel, activations uint8 per row
// (scale and zero point computed on every call), int32 accumulation, float32 output. Shared by the linear op and
// the BERT text encoder (int8_bert.cpp); the operators are registered in int8_ops.cpp.
//
// Packed weight layout, [ceil(N/32), ceil(K/4), 32, 4] int8: for each block of 32 output channels, each group of
// 4 input features holds 32 x 4 bytes, the operand one AVX512-VNNI VPDPBUSD pair multiplies by 4 activation
// bytes broadcast to every lane (AVX2's VPMADDUBSW takes 8 channels x 4 features per 32-byte load). Padding (K to a multiple of 4, N to a multiple of 32) is zero.
#pragma once

#include <ATen/core/Tensor.h>  // not ATen/ATen.h: each source includes the ATen/ops it calls (build time)

#include <cstdint>

namespace laclip {

constexpr int64_t kInt8Cols = 32;  // output channels per packed block
constexpr int64_t kInt8Group = 4;  // input features per VNNI dot product

// A packed linear layer's tensors, checked by check_packed_linear.
struct PackedLinear {
  const int8_t* packed;   // [ceil(N/32), ceil(K/4), 32, 4]
  const float* scale;     // [N] weight scale per output channel
  const int32_t* colsum;  // [N] sum of the channel's int8 weights (for the activation zero point)
  const float* bias;      // [N] or nullptr
  int64_t n, k;
};

// weight [N, K] float32 -> (packed int8, scale [N] float32, colsum [N] int32): symmetric per-channel quantisation
// to [-64, 64] (7 bits: exact in AVX2's VPMADDUBSW, see int8_linear.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> int8_pack_weight(const at::Tensor& weight);

// Validates one packed layer's tensors for inputs of `k` features ("what" names the layer in errors).
PackedLinear check_packed_linear(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& colsum,
                                 const c10::optional<at::Tensor>& bias, int64_t k, const std::string& what);

// out [M, N] = x [M, K] (row-major float32) times the layer, plus bias. Threads with at::parallel_for.
void int8_linear_into(const float* x, int64_t m, const PackedLinear& layer, float* out);

// "avx512_vnni" when this CPU has it and the LACLIP CPU path is not capped below AVX-512 (set_max_isa), else
// "avx2" (AVX2 + FMA, the LACLIP path not capped at generic), else "generic" (portable loops). All three compute
// the same int32 sums, so the same outputs up to float rounding in the epilogue.
const char* int8_isa();

}  // namespace laclip
