"""The native int8 text tower (engine.int8_text, csrc/int8_*.cpp) against the float32 reference.

The int8 GEMM's AVX512-VNNI and AVX2 paths and its portable loops compute the same int32 sums: on integer-valued
inputs (scales of exactly 1) every path this CPU can run must return the exact integer product, and on random
inputs they must agree to float rounding, on shapes none was tuned to (odd row counts cover every AVX2 sub-tile); both must match a float32 matmul to int8 accuracy; and the whole encoder
must match cn_clip's text tower (min cosine >= 0.99, the int8 parity gate) on padded batches, short and long.
"""
from __future__ import annotations

import pytest
import torch

from engine import ops
from engine.backends import TorchEncoder
from engine.errors import InputError
from engine.models import load_model
from engine.towers import TextTower

pytestmark = pytest.mark.skipif(not ops.extension_available(),
                                reason="engine._laclip_ext not built (pip install --no-build-isolation -e .)")

if ops.extension_available():
    from engine.int8_text import Int8TextTower, int8_isa, int8_linear, pack_linear


def _int8_paths() -> dict[str, str]:
    """Each int8 GEMM path this CPU can run -> the set_max_isa cap that selects it."""
    paths: dict[str, str] = {}
    try:
        for cap in ops.cpu_isas():
            ops.set_max_isa(cap)
            paths.setdefault(int8_isa(), cap)
    finally:
        ops.set_max_isa(None)
    return paths


INT8_PATHS = _int8_paths() if ops.extension_available() else {}


@pytest.fixture
def generic_and_fast():
    """Run a callable on the portable loops and on the detected path; restores detection afterwards."""
    def run(fn):
        ops.set_force_generic(True)
        try:
            slow = fn()
        finally:
            ops.set_force_generic(False)
        return slow, fn()
    return run


def _ids(lengths: list[int], width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(672, 7992, (len(lengths), width), generator=g)
    ids[:, 0] = 101
    for row, n in enumerate(lengths):
        ids[row, n - 1] = 102
        ids[row, n:] = 0
    return ids


def _min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b).min())


@pytest.mark.parametrize("m,k,n", [(1, 67, 45), (13, 96, 33), (8, 768, 64), (27, 5, 100)])
def test_int8_linear_paths_agree_and_match_fp32(m, k, n, generic_and_fast):
    g = torch.Generator().manual_seed(m * k + n)
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    x = torch.randn(m, k, generator=g) * 3
    layer = pack_linear(w, b)
    slow, fast = generic_and_fast(lambda: int8_linear(x, layer))
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-4)
    assert _min_cosine(fast, x @ w.T + b) > 0.999


@pytest.mark.parametrize("path", sorted(INT8_PATHS))
@pytest.mark.parametrize("m,k,n", [(1, 67, 45), (2, 130, 33), (3, 5, 100), (5, 509, 64), (7, 96, 31),
                                   (11, 257, 97), (13, 300, 70)])
def test_int8_paths_give_exact_integer_sums(path, m, k, n):
    """Activations 0..255 with each row spanning 0 and 255 quantise to themselves (scale 1, zero point 0), weights
    -64..64 with each channel reaching +-64 to themselves (scale 1; weights are packed in 7 bits): the output is the
    integer product itself, exact in float32 at these K, so every path must return it exactly. Pairs of 255 x 64
    products are the largest AVX2's VPMADDUBSW meets: any saturation would show."""
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    x = torch.randint(0, 256, (m, k), generator=g)
    x[:, 0], x[:, -1] = 0, 255
    w = torch.randint(-64, 65, (n, k), generator=g)
    w[:, k // 2] = torch.where(torch.rand(n, generator=g) < 0.5, -64, 64)
    if k > 4:  # features 2 and 3 form one VPMADDUBSW pair: 255 x 64 twice, +32640 or -32640 in int16
        x[:, 2:4] = 255
        w[: n // 2, 2:4], w[n // 2:, 2:4] = 64, -64
    exact = (x @ w.T).float()
    layer = pack_linear(w.float(), None)
    assert int(layer[0].abs().max()) == 64  # 7-bit weights: the packed values themselves
    ops.set_max_isa(INT8_PATHS[path])
    try:
        assert int8_isa() == path
        out = int8_linear(x.float(), layer)
    finally:
        ops.set_max_isa(None)
    assert torch.equal(out, exact)


@pytest.mark.parametrize("path", sorted(INT8_PATHS))
def test_int8_paths_agree_on_random_inputs(path):
    """Float inputs with per-row scales: every path against the portable loops, rows 1..13 (every AVX2 sub-tile)."""
    g = torch.Generator().manual_seed(7)
    w, b = torch.randn(77, 203, generator=g), torch.randn(77, generator=g)
    x = torch.randn(13, 203, generator=g) * torch.linspace(0.1, 9, 13)[:, None]
    layer = pack_linear(w, b)
    ops.set_max_isa("generic")
    try:
        slow = int8_linear(x, layer)
        ops.set_max_isa(INT8_PATHS[path])
        fast = [int8_linear(x[:rows], layer) for rows in range(1, 14)]
    finally:
        ops.set_max_isa(None)
    for rows, out in enumerate(fast, start=1):
        torch.testing.assert_close(out, slow[:rows], rtol=1e-5, atol=1e-4)


def test_int8_linear_zero_rows_and_constant_rows():
    layer = pack_linear(torch.randn(40, 12), None)
    assert int8_linear(torch.zeros(0, 12), layer).shape == (0, 40)
    out = int8_linear(torch.zeros(3, 12), layer)  # zero activations are exact: scale falls back to 1
    assert torch.equal(out, torch.zeros(3, 40))


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return load_model(tiny_checkpoint, "tiny").model.eval()


@pytest.mark.parametrize("lengths,width", [([8], 8), ([20, 5, 9, 2, 11, 14], 20), ([40, 52, 7], 52)])
def test_encoder_matches_reference(tiny, lengths, width, generic_and_fast):
    """Short sequences take the attention loops, long ones (> 16 tokens) ATen's attention."""
    ids = _ids(lengths, width, seed=width)
    with torch.no_grad():
        ref = TextTower(tiny)(ids)
    tower = Int8TextTower(tiny)
    slow, fast = generic_and_fast(lambda: tower(ids))
    assert _min_cosine(fast, ref) >= 0.99
    assert _min_cosine(slow, ref) >= 0.99
    assert _min_cosine(fast, slow) > 0.9999


def test_torch_encoder_int8_text(tiny):
    ids = _ids([9, 4, 12], 12, seed=3)
    ref = TorchEncoder(tiny, 224).encode_texts(ids)
    out = TorchEncoder(tiny, 224, precision="int8-text").encode_texts(ids)
    assert out.shape == ref.shape
    assert float((out * ref).sum(1).min()) >= 0.99


def test_bad_inputs_name_the_problem(tiny):
    tower = Int8TextTower(tiny)
    with pytest.raises(InputError, match="token id 30000 at \\[0, 1\\] is outside the vocabulary"):
        tower(torch.tensor([[101, 30000, 102]]))
    with pytest.raises(InputError, match="input_ids must be Long"):
        tower(torch.tensor([[101.0, 102.0]]))
    with pytest.raises(InputError, match="positions"):
        tower(torch.full((1, 600), 101))
    with pytest.raises(InputError, match="weights must hold"):
        tower.weights = tower.weights[:-1]
        tower(torch.tensor([[101, 102]]))
    layer = pack_linear(torch.randn(8, 16), None)
    with pytest.raises(InputError, match="packed weight has shape"):
        int8_linear(torch.randn(2, 20), layer)
    with pytest.raises(InputError, match="NaN or infinite"):
        pack_linear(torch.tensor([[1.0, float("nan")]]), None)


def test_opcheck(tiny):
    """Schema, fake kernels and dispatch agree with the real kernels (torch.library.opcheck)."""
    layer = pack_linear(torch.randn(40, 12), torch.randn(40))
    torch.library.opcheck(torch.ops.cnclip.int8_linear.default, (torch.randn(5, 12), *layer))
    torch.library.opcheck(torch.ops.cnclip.int8_pack_linear.default, (torch.randn(40, 12),))
    tower = Int8TextTower(tiny)
    torch.library.opcheck(torch.ops.cnclip.int8_bert_encode.default,
                          (_ids([5, 3], 5, seed=1), tower.weights, tower.heads, tower.eps, 0))


def test_isa_is_reported():
    assert int8_isa() in ("avx512_vnni", "avx2", "generic")
    assert "generic" in INT8_PATHS
    if "avx2" in ops.cpu_isas():  # an AVX2 CPU runs the AVX2 GEMM at least (VNNI where it has it)
        assert int8_isa() in ("avx512_vnni", "avx2") and "avx2" in INT8_PATHS
    ops.set_force_generic(True)
    try:
        assert int8_isa() == "generic"
    finally:
        ops.set_force_generic(False)
