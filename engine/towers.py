"""cn_clip's two towers restated batch-first with fused attention: same parameters, same maths, faster graphs.

cn_clip's eager forward is sequence-first (`nn.MultiheadAttention`) and spells BERT attention out op by op;
exported as is, that is ~20 Reshape/Transpose/Gather/MatMul nodes per layer, and on CUDA it never reaches a
fused attention kernel under autocast. Here each transformer layer runs batch-first over 2-D token matrices
(every linear layer one Gemm with its bias fused) with `scaled_dot_product_attention`, which exports as one
ONNX `Attention` node at opset >= 23 (MatMul/Softmax/MatMul below it, the form TensorRT fuses itself) and runs
flash or memory-efficient attention on CUDA. The last layer runs its query, output projection and MLP for the
first token only: the towers return that token's embedding, so the other rows are dead work. Outputs are
cn_clip's raw projected embeddings (`encode_image` / `encode_text`, not L2-normalised); tests compare them with
the eager model. RN50's ResNet image tower is run as cn_clip wrote it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PAD_ID = 0  # cn_clip's [PAD]; the tokenizer pads with it and the text tower masks it out
MASKED_SCORE = -10000.0  # cn_clip BERT's additive score for a [PAD] key


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[B, S, D_in] -> [B, S, D_out] as one 2-D Gemm (a 3-D MatMul would leave the bias as a separate Add)."""
    b, s, d = x.shape
    return F.linear(x.reshape(b * s, d), weight, bias).reshape(b, s, weight.shape[0])


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention of q [B, Sq, D] over k, v [B, S, D]; `mask` is additive, [B, 1, 1, S].

    The mask is expanded to [B, 1, Sq, S]: ONNX Runtime's Attention kernel does not broadcast the query axis.
    """
    b, sq, d = q.shape
    if mask is not None:
        mask = mask.expand(b, 1, sq, mask.shape[-1])

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, t.shape[1], heads, d // heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
    return out.transpose(1, 2).reshape(b, sq, d)


class _SplitQKV(nn.Module):
    """A block's packed in-projection as separate query and key/value weights (copies, so each exports as a
    constant the int8 quantiser sees, instead of a Slice computed on every call)."""

    def __init__(self, attn: nn.MultiheadAttention) -> None:
        super().__init__()
        d = attn.embed_dim
        weight, bias = attn.in_proj_weight.detach(), attn.in_proj_bias.detach()
        self.q_weight, self.q_bias = nn.Parameter(weight[:d].clone()), nn.Parameter(bias[:d].clone())
        self.kv_weight, self.kv_bias = nn.Parameter(weight[d:].clone()), nn.Parameter(bias[d:].clone())


def _vit_block(block: nn.Module, x: torch.Tensor, first_token_qkv: _SplitQKV | None = None) -> torch.Tensor:
    """cn_clip ResidualAttentionBlock (pre-LN, QuickGELU MLP) on batch-first x [B, S, D]; given the block's split
    in-projection, only the first token's query and output row are computed."""
    attn, mlp = block.attn, block.mlp
    h = block.ln_1(x)
    if first_token_qkv is not None:
        split = first_token_qkv
        x, q = x[:, :1], _linear(h[:, :1], split.q_weight, split.q_bias)
        k, v = _linear(h, split.kv_weight, split.kv_bias).chunk(2, dim=-1)
    else:
        q, k, v = _linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    x = x + _linear(_attention(q, k, v, attn.num_heads), attn.out_proj.weight, attn.out_proj.bias)
    h = mlp.gelu(_linear(block.ln_2(x), mlp.c_fc.weight, mlp.c_fc.bias))
    return x + _linear(h, mlp.c_proj.weight, mlp.c_proj.bias)


def _bert_layer(layer: nn.Module, x: torch.Tensor, mask: torch.Tensor,
                first_token_only: bool = False) -> torch.Tensor:
    """cn_clip BertLayer (post-LN, erf GELU) on x [B, S, D] with an additive key mask [B, 1, 1, S]."""
    sa, out = layer.attention.self, layer.attention.output
    query_rows = x[:, :1] if first_token_only else x
    q = _linear(query_rows, sa.query.weight, sa.query.bias)
    k, v = _linear(x, sa.key.weight, sa.key.bias), _linear(x, sa.value.weight, sa.value.bias)
    context = _attention(q, k, v, sa.num_attention_heads, mask)
    a = out.LayerNorm(_linear(context, out.dense.weight, out.dense.bias) + query_rows)
    h = layer.intermediate.intermediate_act_fn(_linear(a, layer.intermediate.dense.weight,
                                                       layer.intermediate.dense.bias))
    return layer.output.LayerNorm(_linear(h, layer.output.dense.weight, layer.output.dense.bias) + a)


class VisionTower(nn.Module):
    """[B, 3, R, R] float32 normalised pixels -> [B, D] image embeddings (cn_clip `encode_image`)."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.visual = clip.visual
        self.is_vit = hasattr(self.visual, "transformer")  # RN50's image tower is a ResNet
        if self.is_vit:
            self.last_qkv = _SplitQKV(self.visual.transformer.resblocks[-1].attn)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        v = self.visual
        if not self.is_vit:  # a ResNet with attention pooling: exported as cn_clip wrote it
            return v(pixel_values)
        x = v.conv1(pixel_values).flatten(2).transpose(1, 2)
        cls = v.class_embedding.reshape(1, 1, -1).expand(x.shape[0], 1, x.shape[2])
        x = v.ln_pre(torch.cat([cls, x], dim=1) + v.positional_embedding)
        *blocks, last = v.transformer.resblocks
        for block in blocks:
            x = _vit_block(block, x)
        x = _vit_block(last, x, first_token_qkv=self.last_qkv)
        return v.ln_post(x[:, 0, :]) @ v.proj


class TextTower(nn.Module):
    """[B, L] int64 token ids -> [B, D] text embeddings; the attention mask (ids != pad_id) is computed inside."""

    def __init__(self, clip: nn.Module, pad_id: int = PAD_ID) -> None:
        super().__init__()
        self.bert = clip.bert
        self.text_projection = clip.text_projection
        self.pad_id = pad_id

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        keep = input_ids.ne(self.pad_id).to(torch.float32)
        mask = ((1.0 - keep) * MASKED_SCORE)[:, None, None, :]
        x = self.bert.embeddings(input_ids)
        *layers, last = self.bert.encoder.layer
        for layer in layers:
            x = _bert_layer(layer, x, mask)
        x = _bert_layer(last, x, mask, first_token_only=True)
        return x[:, 0, :] @ self.text_projection
