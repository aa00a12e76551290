"""cn_clip's text tower with int8 linear layers, run by the extension's native encoder (csrc/int8_bert.cpp).

For a short query the text tower's cost is reading its weights (85M for ViT-B-16's RoBERTa-base), and with 8
tokens the int8 matrix products of ONNX Runtime and PyTorch run well below the memory rate; the native encoder
streams each layer's int8 weights once per call through AVX512-VNNI dot products (on AVX2-only CPUs VPMADDUBSW,
exact because the weights have 7-bit values; portable loops elsewhere; all with identical integer sums) and does
the rest (embeddings, LayerNorm, attention, GELU) in float32 with no per-op framework cost. Weights are quantised
per output channel (symmetric, values in [-64, 64]), activations per row on every call (asymmetric uint8, the
scheme of ONNX Runtime's dynamic int8, which also keeps 7-bit weights). The text projection stays float32.

Operators (torch.ops.cnclip.*, checked in csrc/int8_ops.cpp; fake kernels below for torch.compile):
int8_pack_linear(weight [N, K]) -> (packed, scale, colsum); int8_linear(x [M, K], packed, scale, colsum, bias)
-> [M, N]; int8_bert_encode(input_ids [B, L], weights, heads, eps, pad_id) -> [B, H] first-token states.
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import InputError
from .ops import call_checked, extension, extension_available

__all__ = ["Int8TextTower", "int8_isa", "int8_linear", "pack_bert", "pack_linear"]


def int8_isa() -> str:
    """The int8 GEMM's code path on this CPU: 'avx512_vnni', 'avx2' or 'generic' (capped with
    engine.ops.set_max_isa: a cap at 'avx2' runs the AVX2 GEMM even on a VNNI CPU)."""
    return str(extension().int8_isa())


def _floats(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().contiguous()


def pack_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> list[torch.Tensor]:
    """A Linear layer's [N, K] weight and [N] bias as the native layout: [packed, scale, colsum, bias]."""
    extension()
    packed, scale, colsum = call_checked(torch.ops.cnclip.int8_pack_linear, _floats(weight))
    return [packed, scale, colsum, torch.zeros(weight.shape[0]) if bias is None else _floats(bias)]


def int8_linear(x: torch.Tensor, layer: list[torch.Tensor]) -> torch.Tensor:
    """x [M, K] float32 through a `pack_linear` layer -> [M, N] float32."""
    return call_checked(torch.ops.cnclip.int8_linear, x, *layer)


def pack_bert(bert: nn.Module) -> list[torch.Tensor]:
    """cn_clip's BertModel as int8_bert_encode's weight list: word and position embeddings (token type 0 added to
    the positions: cn_clip's text tower has one segment), the embedding LayerNorm, then per layer 20 tensors
    (query/key/value as one packed layer, attention output, its LayerNorm, intermediate, output, its LayerNorm)."""
    emb = bert.embeddings
    out = [_floats(emb.word_embeddings.weight),
           _floats(emb.position_embeddings.weight + emb.token_type_embeddings.weight[0]),
           _floats(emb.LayerNorm.weight), _floats(emb.LayerNorm.bias)]
    for layer in bert.encoder.layer:
        sa, attn_out = layer.attention.self, layer.attention.output
        qkv_w = torch.cat([sa.query.weight, sa.key.weight, sa.value.weight])
        qkv_b = torch.cat([sa.query.bias, sa.key.bias, sa.value.bias])
        out += pack_linear(qkv_w, qkv_b) + pack_linear(attn_out.dense.weight, attn_out.dense.bias)
        out += [_floats(attn_out.LayerNorm.weight), _floats(attn_out.LayerNorm.bias)]
        out += pack_linear(layer.intermediate.dense.weight, layer.intermediate.dense.bias)
        out += pack_linear(layer.output.dense.weight, layer.output.dense.bias)
        out += [_floats(layer.output.LayerNorm.weight), _floats(layer.output.LayerNorm.bias)]
    return out


class Int8TextTower:
    """[B, L] int64 token ids -> [B, D] text embeddings (cn_clip `encode_text`, not normalised), int8 weights."""

    def __init__(self, clip: nn.Module, pad_id: int = 0) -> None:
        bert = clip.bert
        act = getattr(bert.encoder.layer[0].intermediate, "intermediate_act_fn", None)
        if getattr(act, "__name__", "") != "gelu":
            raise InputError(f"the int8 text tower runs erf GELU BERT layers; this model's activation is {act!r}")
        self.weights = pack_bert(bert)
        self.heads = int(bert.encoder.layer[0].attention.self.num_attention_heads)
        self.eps = float(bert.embeddings.LayerNorm.eps)
        self.pad_id = pad_id
        self.projection = _floats(clip.text_projection)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        first = call_checked(torch.ops.cnclip.int8_bert_encode, input_ids.contiguous(), self.weights, self.heads, self.eps,
                      self.pad_id)
        return first @ self.projection


if extension_available():
    # Output shapes for torch.compile / FakeTensor tracing; the values are checked when the real kernel runs.
    @torch.library.register_fake("cnclip::int8_pack_linear")
    def _pack_fake(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, k = weight.shape
        packed = weight.new_empty(((n + 31) // 32, (k + 3) // 4, 32, 4), dtype=torch.int8)
        return packed, weight.new_empty((n,), dtype=torch.float32), weight.new_empty((n,), dtype=torch.int32)

    @torch.library.register_fake("cnclip::int8_linear")
    def _linear_fake(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, colsum: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
        return x.new_empty((x.shape[0], scale.shape[0]), dtype=torch.float32)

    @torch.library.register_fake("cnclip::int8_bert_encode")
    def _bert_fake(input_ids: torch.Tensor, weights: list[torch.Tensor], heads: int, eps: float,
                   pad_id: int) -> torch.Tensor:
        return weights[0].new_empty((input_ids.shape[0], weights[0].shape[1]))
