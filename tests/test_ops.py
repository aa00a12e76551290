"""The native LACLIP kernel (engine.ops) against the pure-PyTorch reference (engine.laclip).

fp32 inputs: allclose to laclip_scores_reference (atol 1e-5). fp16 and bf16 inputs (flash-attention rule): the truth
is the LACLIP formula in float64 on the same rounded values; the kernel's max error against it must be at most twice
PyTorch's own error (the formula evaluated in fp16 / bf16 arithmetic) plus a small epsilon.
Every CPU code path this CPU can run (generic, avx2, avx512, avx512_bf16, amx_bf16) is compared with the
reference; the operators pass torch.library.opcheck and run inside torch.compile(fullgraph=True).
CUDA cases (marked `cuda`) mirror the CPU ones and are skipped without a GPU.
"""
from __future__ import annotations

import pytest
import torch

from engine import ops
from engine.errors import InputError
from engine.laclip import image_weights, laclip_scores_reference, laclip_topk_reference

pytestmark = pytest.mark.skipif(not ops.extension_available(),
                                reason="engine._laclip_ext not built (pip install --no-build-isolation -e .)")

CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                        reason="needs a CUDA GPU")])
DEVICES = ["cpu", CUDA]
ALPHA_TAU = [(a, t) for a in (0.0, 0.5, 1.0) for t in (0.01, 1.0)]
# (Q, N, K, D): sizes of 1, 7 and 769, K in {1, 4, 9}, D in {32, 67, 512}
SHAPES = [(1, 1, 1, 32), (1, 769, 4, 512), (7, 7, 9, 67), (7, 769, 9, 512), (769, 7, 4, 32), (13, 100, 1, 67),
          (769, 769, 9, 512)]
SHAPES_FP16 = [s for s in SHAPES if s[0] * s[1] * s[2] < 2_000_000]
LOW_PRECISION = {"fp16": torch.float16, "bf16": torch.bfloat16}


def make_inputs(q: int, n: int, k: int, d: int, dtype: torch.dtype = torch.float32, device: str = "cpu",
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random L2-normalised T [q, d], G [n, d], C [n, k, d] from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)

    def unit(*shape: int) -> torch.Tensor:
        x = torch.randn(*shape, generator=gen)
        return (x / x.norm(dim=-1, keepdim=True)).to(dtype=dtype, device=device)

    return unit(q, d), unit(n, d), unit(n, k, d)


def formula(t: torch.Tensor, g: torch.Tensor, c: torch.Tensor, alpha: float, tau: float, weights: str) -> torch.Tensor:
    """The reference's formula evaluated in the inputs' own dtype (float64 truth, fp16 PyTorch baseline)."""
    crop_sims = torch.einsum("qd,nkd->qnk", t, c)
    w = image_weights(g, c, tau).unsqueeze(0) if weights == "image" else torch.softmax(crop_sims / tau, dim=-1)
    return alpha * (t @ g.T) + (1 - alpha) * (w * crop_sims).sum(-1)


def low_precision_bound(t: torch.Tensor, g: torch.Tensor, c: torch.Tensor, alpha: float, tau: float,
                        weights: str) -> tuple[torch.Tensor, float]:
    """(float64 truth on the fp16/bf16 values, allowed kernel error = 2 x PyTorch's error in that dtype + eps)."""
    t, g, c = t.cpu(), g.cpu(), c.cpu()
    truth = formula(t.double(), g.double(), c.double(), alpha, tau, weights)
    torch_err = (formula(t, g, c, alpha, tau, weights).double() - truth).abs().max().item()
    return truth, 2 * torch_err + 1e-6


def check_scores(out: torch.Tensor, t: torch.Tensor, g: torch.Tensor, c: torch.Tensor, alpha: float, tau: float,
                 weights: str) -> None:
    assert out.dtype == torch.float32 and out.device == t.device and out.shape == (t.shape[0], g.shape[0])
    if t.dtype in LOW_PRECISION.values():
        truth, bound = low_precision_bound(t, g, c, alpha, tau, weights)
        err = (out.cpu().double() - truth).abs().max().item()
        assert err <= bound, f"{t.dtype} kernel error {err:.3g} > 2 x PyTorch's own error + eps = {bound:.3g}"
    else:
        ref = laclip_scores_reference(t.cpu(), g.cpu(), c.cpu(), alpha=alpha, tau=tau, weights=weights)
        torch.testing.assert_close(out.cpu(), ref, atol=1e-5, rtol=1e-5)


def check_topk(values: torch.Tensor, indices: torch.Tensor, t: torch.Tensor, g: torch.Tensor, c: torch.Tensor,
               k: int, alpha: float, tau: float, weights: str) -> None:
    q, n = t.shape[0], g.shape[0]
    assert values.shape == indices.shape == (q, k)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64 and values.device == t.device
    values, indices = values.cpu(), indices.cpu()
    ref_scores = laclip_scores_reference(t.cpu().float(), g.cpu().float(), c.cpu().float(), alpha=alpha, tau=tau,
                                         weights=weights)
    ref_vals, ref_idx = laclip_topk_reference(t.cpu().float(), g.cpu().float(), c.cpu().float(), k=k, alpha=alpha,
                                              tau=tau, weights=weights)
    atol = 1e-5
    torch.testing.assert_close(values, ref_vals, atol=atol, rtol=1e-5)
    assert bool((values[:, 1:] <= values[:, :-1]).all()), "values are not sorted best first"
    assert all(len(set(row.tolist())) == k for row in indices), "duplicate indices"
    assert int(indices.min()) >= 0 and int(indices.max()) < n
    # every returned index really has the returned score
    torch.testing.assert_close(ref_scores.gather(1, indices), values, atol=atol, rtol=1e-5)
    # where the reference's ranking is well separated from its neighbours (and the (k+1)-th), indices agree
    full = torch.sort(ref_scores, dim=1, descending=True, stable=True).values
    gap = 10 * atol
    padded = torch.cat([full[:, :1] + 1, full, full[:, -1:] - 1], dim=1)[:, : k + 2]
    separated = ((padded[:, :-2] - padded[:, 1:-1]) > gap) & ((padded[:, 1:-1] - padded[:, 2:]) > gap)
    assert torch.equal(indices[separated], ref_idx[separated])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weights", ["image", "text"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "Q{}-N{}-K{}-D{}".format(*s))
def test_scores_fp32(shape: tuple[int, int, int, int], weights: str, device: str) -> None:
    t, g, c = make_inputs(*shape, device=device, seed=sum(shape))
    for alpha, tau in ALPHA_TAU:
        check_scores(ops.laclip_scores(t, g, c, alpha=alpha, tau=tau, weights=weights), t, g, c, alpha, tau, weights)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(LOW_PRECISION.values()), ids=list(LOW_PRECISION))
@pytest.mark.parametrize("weights", ["image", "text"])
@pytest.mark.parametrize("shape", SHAPES_FP16, ids=lambda s: "Q{}-N{}-K{}-D{}".format(*s))
def test_scores_low_precision(shape: tuple[int, int, int, int], weights: str, dtype: torch.dtype,
                              device: str) -> None:
    t, g, c = make_inputs(*shape, dtype=dtype, device=device, seed=sum(shape))
    for alpha, tau in [(0.0, 0.01), (0.5, 1.0), (1.0, 0.01)]:
        check_scores(ops.laclip_scores(t, g, c, alpha=alpha, tau=tau, weights=weights), t, g, c, alpha, tau, weights)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("weights", ["image", "text"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 32), (7, 7, 9, 67), (1, 769, 4, 512), (7, 769, 9, 512),
                                   (769, 7, 4, 32)], ids=lambda s: "Q{}-N{}-K{}-D{}".format(*s))
def test_topk(shape: tuple[int, int, int, int], weights: str, dtype: torch.dtype, device: str) -> None:
    t, g, c = make_inputs(*shape, dtype=dtype, device=device, seed=7 + sum(shape))
    n = shape[1]
    for k in sorted({1, 10, n} & set(range(1, n + 1))):
        for alpha, tau in [(0.5, 0.01), (0.0, 1.0)]:
            values, indices = ops.laclip_topk(t, g, c, k=k, alpha=alpha, tau=tau, weights=weights)
            check_topk(values, indices, t, g, c, k, alpha, tau, weights)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weights", ["image", "text"])
def test_topk_equals_sorted_scores(weights: str, device: str) -> None:
    """The fused top-k agrees exactly with sorting the kernel's own full score matrix."""
    t, g, c = make_inputs(5, 769, 4, 512, device=device, seed=3)
    scores = ops.laclip_scores(t, g, c, alpha=0.3, tau=0.05, weights=weights)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :25]
    values, indices = ops.laclip_topk(t, g, c, k=25, alpha=0.3, tau=0.05, weights=weights)
    assert torch.equal(indices, order)
    assert torch.equal(values, scores.gather(1, order))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("weights", ["image", "text"])
def test_topk_ties_go_to_lower_index(weights: str, dtype: torch.dtype, device: str) -> None:
    """Duplicated images score identically; the lower index must come first (also across thread chunks)."""
    t, g, c = make_inputs(3, 769, 4, 512, dtype=torch.float32, seed=11)
    dups = [5, 301, 302, 500, 766]
    g[dups] = g[dups[0]].clone()
    c[dups] = c[dups[0]].clone()
    t[0] = g[dups[0]]  # query 0 prefers the duplicated image by far
    t[1] = c[dups[0], 2]  # with "text" weights that crop dominates too
    t, g, c = t.to(dtype=dtype, device=device), g.to(dtype=dtype, device=device), c.to(dtype=dtype, device=device)
    values, indices = ops.laclip_topk(t, g, c, k=len(dups), alpha=0.5, tau=0.1, weights=weights)
    for q in (0, 1) if weights == "text" else (0,):
        assert indices[q].tolist() == dups
        assert len(set(values[q].tolist())) == 1
    # k cutting through a tie keeps the lowest indices
    values, indices = ops.laclip_topk(t, g, c, k=2, alpha=0.5, tau=0.1, weights=weights)
    assert indices[0].tolist() == dups[:2]
    # all-equal scores: an all-zero query ties every image, so top-k is 0..k-1
    zero = torch.zeros_like(t[:1])
    values, indices = ops.laclip_topk(zero, g, c, k=10, alpha=0.5, tau=0.1, weights=weights)
    assert indices[0].tolist() == list(range(10))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weights", ["image", "text"])
def test_non_contiguous_inputs(weights: str, device: str) -> None:
    t, g, c = make_inputs(9, 130, 4, 67, seed=5)
    t_wide = torch.zeros(9, 134, device=device)
    t_wide[:, ::2] = t.to(device)
    t_view = t_wide[:, ::2]  # stride 2 along D
    g_view = g.T.contiguous().to(device).T  # column-major
    c_view = c.transpose(0, 1).contiguous().to(device).transpose(0, 1)  # [N, K, D], N and K strides swapped
    assert not (t_view.is_contiguous() or g_view.is_contiguous() or c_view.is_contiguous())
    t, g, c = t.to(device), g.to(device), c.to(device)
    out = ops.laclip_scores(t_view, g_view, c_view, alpha=0.5, tau=0.1, weights=weights)
    check_scores(out, t, g, c, 0.5, 0.1, weights)
    values, indices = ops.laclip_topk(t_view, g_view, c_view, k=10, alpha=0.5, tau=0.1, weights=weights)
    check_topk(values, indices, t, g, c, 10, 0.5, 0.1, weights)


@pytest.mark.parametrize("dim", [67, 96], ids=["D67", "D96"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("weights", ["image", "text"])
def test_every_cpu_path_matches(weights: str, dtype: torch.dtype, dim: int) -> None:
    """Each code path this CPU can run (portable loops, AVX2, AVX-512, AVX-512 BF16, AMX) against the reference.
    D = 96 is what AMX tiles take (a multiple of 32: three tile rows), with partial 16-row and 16-query blocks
    (13 queries, 200 images x 4 crops); D = 67 sends AMX's bf16 dots to the AVX-512 BF16 ones."""
    t, g, c = make_inputs(13, 200, 4, dim, dtype=dtype, seed=9)
    auto = ops.laclip_scores(t, g, c, alpha=0.5, tau=0.05, weights=weights)
    for path in ops.cpu_isas():
        ops.set_max_isa(path)
        try:
            assert ops.cpu_isa() == path
            scores = ops.laclip_scores(t, g, c, alpha=0.5, tau=0.05, weights=weights)
            values, indices = ops.laclip_topk(t, g, c, k=10, alpha=0.5, tau=0.05, weights=weights)
        finally:
            ops.set_max_isa(None)
        check_scores(scores, t, g, c, 0.5, 0.05, weights)
        check_topk(values, indices, t, g, c, 10, 0.5, 0.05, weights)
        if path == ops.cpu_isa():
            assert torch.equal(scores, auto)


def test_force_generic() -> None:
    ops.set_force_generic(True)
    try:
        assert ops.cpu_isa() == "generic"
    finally:
        ops.set_force_generic(False)
    assert ops.cpu_isa() == ops.cpu_isas()[-1]


def test_thread_count_does_not_change_results() -> None:
    t, g, c = make_inputs(7, 769, 4, 512, seed=2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.laclip_topk(t, g, c, k=50, alpha=0.5, tau=0.1, weights="text")
    finally:
        torch.set_num_threads(before)
    many = ops.laclip_topk(t, g, c, k=50, alpha=0.5, tau=0.1, weights="text")
    assert torch.equal(one[1], many[1]) and torch.equal(one[0], many[0])


# ------------------------------------------------------------------------------------------------ bad inputs
def _good(device: str = "cpu") -> dict:
    t, g, c = make_inputs(3, 5, 2, 8, device=device)
    return {"t": t, "g": g, "c": c, "alpha": 0.5, "tau": 0.1, "weights": "text"}


BAD_INPUTS = {
    "T rank": (lambda a: a.update(t=a["t"][0]), "text embeddings T"),
    "G rank": (lambda a: a.update(g=a["g"][None]), "global image embeddings G"),
    "C rank": (lambda a: a.update(c=a["c"][:, 0]), "crop embeddings C"),
    "T dtype int": (lambda a: a.update(t=a["t"].to(torch.int32)), "text embeddings T"),
    "T dtype fp64": (lambda a: a.update(t=a["t"].double()), "text embeddings T"),
    "G dtype mixed": (lambda a: a.update(g=a["g"].half()), "global image embeddings G"),
    "C dtype mixed": (lambda a: a.update(c=a["c"].half()), "crop embeddings C"),
    "G dtype bf16": (lambda a: a.update(g=a["g"].bfloat16()), "global image embeddings G"),
    "G wrong D": (lambda a: a.update(g=a["g"][:, :7]), "global image embeddings G"),
    "C wrong D": (lambda a: a.update(c=a["c"][:, :, :7]), "crop embeddings C"),
    "C wrong N": (lambda a: a.update(c=a["c"][:4]), "crop embeddings C"),
    "K = 0": (lambda a: a.update(c=a["c"][:, :0]), "crop embeddings C"),
    "N = 0": (lambda a: a.update(g=a["g"][:0], c=a["c"][:0]), "global image embeddings G"),
    "Q = 0": (lambda a: a.update(t=a["t"][:0]), "text embeddings T"),
    "T not a tensor": (lambda a: a.update(t=a["t"].tolist()), "text embeddings T"),
    "tau = 0": (lambda a: a.update(tau=0.0), "tau"),
    "tau < 0": (lambda a: a.update(tau=-1.0), "tau"),
    "tau nan": (lambda a: a.update(tau=float("nan")), "tau"),
    "alpha < 0": (lambda a: a.update(alpha=-0.1), "alpha"),
    "alpha > 1": (lambda a: a.update(alpha=1.5), "alpha"),
    "weights": (lambda a: a.update(weights="pooled"), "weights"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
@pytest.mark.parametrize("op", ["scores", "topk"])
def test_bad_inputs_raise_input_error(case: str, op: str) -> None:
    args = _good()
    mutate, name = BAD_INPUTS[case]
    mutate(args)
    with pytest.raises(InputError, match=name):
        if op == "scores":
            ops.laclip_scores(args["t"], args["g"], args["c"], alpha=args["alpha"], tau=args["tau"],
                              weights=args["weights"])
        else:
            ops.laclip_topk(args["t"], args["g"], args["c"], k=2, alpha=args["alpha"], tau=args["tau"],
                            weights=args["weights"])


@pytest.mark.parametrize("k", [0, -1, 6, True, 2.0])
def test_bad_k_raises_input_error(k: object) -> None:
    a = _good()
    with pytest.raises(InputError, match="k"):
        ops.laclip_topk(a["t"], a["g"], a["c"], k=k, alpha=0.5, tau=0.1, weights="image")  # type: ignore[arg-type]


@pytest.mark.parametrize("case", ["T rank", "C wrong N", "K = 0", "G dtype mixed", "tau nan"])
def test_operator_validates_on_its_own(case: str) -> None:
    """The C++ entry checks inputs itself (ValueError naming the tensor) when called without the Python wrapper."""
    args = _good()
    mutate, name = BAD_INPUTS[case]
    mutate(args)
    with pytest.raises(ValueError, match=name):
        torch.ops.cnclip.laclip_scores(args["t"], args["g"], args["c"], 0.5, args["tau"], True)
    with pytest.raises(ValueError, match="alpha"):
        torch.ops.cnclip.laclip_topk(*_good_tensors(), 1, 2.0, 0.1, True)
    with pytest.raises(ValueError, match="k must be"):
        torch.ops.cnclip.laclip_topk(*_good_tensors(), 99, 0.5, 0.1, True)


def _good_tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a = _good()
    return a["t"], a["g"], a["c"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_mismatch_raises() -> None:
    t, g, c = make_inputs(3, 5, 2, 8)
    with pytest.raises(InputError, match="global image embeddings G"):
        ops.laclip_scores(t.cuda(), g, c.cuda(), alpha=0.5, tau=0.1, weights="text")
    with pytest.raises(InputError, match="crop embeddings C"):
        ops.laclip_topk(t.cuda(), g.cuda(), c, k=2, alpha=0.5, tau=0.1, weights="text")


def test_missing_extension_raises_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "_ext", None)
    assert not ops.extension_available() and not ops.cuda_available()
    t, g, c = make_inputs(1, 2, 1, 4)
    with pytest.raises(ImportError, match="pip install --no-build-isolation -e"):
        ops.laclip_scores(t, g, c, alpha=0.5, tau=0.1, weights="image")
    with pytest.raises(ops.ExtensionNotBuiltError):
        ops.laclip_topk(t, g, c, k=1, alpha=0.5, tau=0.1, weights="image")


def test_availability_flags() -> None:
    assert ops.extension_available()
    assert ops.cuda_available() == (bool(ops.extension().built_with_cuda()) and torch.cuda.is_available())
    assert ops.cpu_isa() in ("amx_bf16", "avx512_bf16", "avx512", "avx2", "generic")
    assert ops.cpu_isas()[0] == "generic" and ops.cpu_isa() in ops.cpu_isas()


# ------------------------------------------------------------------------------------------- torch.library
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck(dtype: torch.dtype) -> None:
    """Schema, fake (meta) kernels and dispatch agree with the real kernels (torch.library.opcheck)."""
    t, g, c = make_inputs(5, 33, 3, 40, dtype=dtype, seed=4)
    torch.library.opcheck(torch.ops.cnclip.laclip_scores.default, (t, g, c, 0.5, 0.1, True))
    torch.library.opcheck(torch.ops.cnclip.laclip_topk.default, (t, g, c, 7, 0.3, 0.2, False))


def _pipeline(t: torch.Tensor, g: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
    scores = torch.ops.cnclip.laclip_scores(t, g, c, 0.5, 0.1, True)
    values, indices = torch.ops.cnclip.laclip_topk(t, g, c, 4, 0.5, 0.1, False)
    return scores.softmax(dim=1), values * 2, indices


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph(backend: str) -> None:
    """Both operators trace into one graph (no graph break; fake kernels give the shapes) and match eager.

    aot_eager runs Dynamo's capture and AOT tracing with fake tensors (what the registration must support) without
    inductor's C++ code generation, which takes minutes on a 2-core CI machine; the inductor case is marked slow.
    """
    t, g, c = make_inputs(6, 50, 3, 32, seed=8)
    compiled = torch.compile(_pipeline, fullgraph=True, dynamic=False, backend=backend)
    for got, want in zip(compiled(t, g, c), _pipeline(t, g, c)):
        torch.testing.assert_close(got, want)
