"""The GPU path's host-side logic on the CPU (resident columns, device top-k keys, compiled buckets, device views),
and its CUDA cases (skipped without a GPU): the device scan against the host scan, the kernel's three CUDA paths
against each other, bf16-compiled text on CUDA, and nvJPEG views against the PIL path."""
from __future__ import annotations

import gc
import io

import numpy as np
import pytest
import torch
from PIL import Image

from engine import ops
from engine.backends.torch_backend import CompiledBuckets
from engine.device_views import DeviceViewMaker, file_seed
from engine.errors import ImageDecodeError, InputError
from engine.index import Index, IndexManifest
from engine.index.manifest import AnnConfig
from engine.index.residency import Residency, ResidencyConfig
from engine.index.search import Placement, device_topk, device_topk_merge, keys_to_results, sort_keys
from engine.index.topk import topk_rows
from engine.laclip import CropConfig, LaclipConfig, ScoreConfig
from engine.preprocess import ImageTransform, load_image

CUDA = pytest.mark.skipif(not (torch.cuda.is_available() and ops.extension_available() and ops.cuda_available()),
                          reason="needs a CUDA GPU and the extension built with CUDA")


class Owner:
    """Stands in for a segment part: any weak-referenceable object owns resident columns."""

    def __init__(self, values: np.ndarray) -> None:
        self.vectors = values
        self.crops = None


def _unit(*shape: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ------------------------------------------------------------------------------------------- resident columns
def test_resident_copies_follow_their_owner_not_its_address():
    """Owners are dropped without forget() and new ones made until addresses repeat: a copy is never served to
    an owner that merely reuses a dead one's address (the id(part) bug)."""
    place = Placement("cpu", residency=ResidencyConfig())
    seen = set()
    for i in range(40):
        part = Owner(np.full((8, 4), float(i), np.float32))
        place.column(part, "vectors")
        place.resident.wait()
        got = place.rows(part, "vectors", slice(0, 8))
        assert torch.equal(got, torch.full((8, 4), float(i))), f"owner {i} was served another owner's rows"
        seen.add(id(part))
        del part, got
        gc.collect()
    assert len(seen) < 40  # addresses were reused, so the check above meant something


def test_a_column_that_did_not_fit_is_retried_once_memory_is_freed():
    free = {"bytes": 0}
    res = Residency(torch.device("cpu"), ResidencyConfig(reserve=0.0, retry_s=3600),
                    free_bytes=lambda device: (free["bytes"], 1 << 30))
    owner = Owner(np.ones((256, 4), np.float32))
    assert res.request(owner, "vectors", lambda: owner.vectors) is None
    res.wait()
    assert res.get(owner, "vectors") is None  # did not fit
    free["bytes"] = 1 << 30
    assert res.request(owner, "vectors", lambda: owner.vectors) is None  # remembered as a miss: not retried yet
    res.wait()
    assert res.get(owner, "vectors") is None
    res.forget([])  # memory was freed somewhere: misses are forgotten
    res.request(owner, "vectors", lambda: owner.vectors)
    res.wait()
    assert torch.equal(res.get(owner, "vectors"), torch.ones(256, 4))


def test_derived_columns_are_evicted_least_recently_used_first():
    res = Residency(torch.device("cpu"), ResidencyConfig(derived_per_owner=2))
    owner = Owner(np.zeros((2, 2), np.float32))
    for name in ("a", "b"):
        res.put(owner, f"derived:{name}", torch.zeros(1), derived=True)
    assert res.get(owner, "derived:a") is not None  # a is now the most recently used
    res.put(owner, "derived:c", torch.zeros(1), derived=True)
    assert res.get(owner, "derived:b") is None
    assert res.get(owner, "derived:a") is not None and res.get(owner, "derived:c") is not None


def test_forgotten_owners_lose_their_copies():
    place = Placement("cpu", residency=ResidencyConfig())
    part = Owner(_unit(10, 4))
    place.column(part, "vectors")
    place.resident.wait()
    assert place.resident.get(part, "vectors") is not None
    place.forget([part])
    assert place.resident.get(part, "vectors") is None and place.resident.resident_bytes() == 0


# ---------------------------------------------------------------------------------------------- device top-k
@pytest.mark.parametrize("k", [1, 5, 40])
def test_device_topk_keys_match_the_host_rule_with_ties_and_signs(k):
    rng = np.random.default_rng(k)
    scores = rng.choice(np.array([-1.5, -0.0, 0.0, 0.25, 0.25, 2.0, -2.0], np.float32), size=(3, 40))
    scores[1] = rng.standard_normal(40).astype(np.float32)
    want_values, want_rows = topk_rows(scores, k)
    values, rows = device_topk(torch.from_numpy(scores), k)
    assert np.array_equal(rows.numpy(), want_rows)
    assert np.array_equal(values.numpy(), want_values)
    # keys round-trip scores and rows, -0.0 folded into +0.0
    back_scores, back_rows = keys_to_results(sort_keys(torch.from_numpy(scores), torch.arange(40).expand(3, -1)))
    assert np.array_equal(back_rows.numpy(), np.broadcast_to(np.arange(40), (3, 40)))
    assert np.array_equal(back_scores.numpy(), scores + 0.0)


def test_device_topk_merge_equals_one_topk_over_both_blocks():
    scores = torch.from_numpy(np.random.default_rng(1).standard_normal((4, 300)).astype(np.float32))
    scores[:, 250] = scores[:, 10]  # a tie across blocks: the lower row wins
    a, b = device_topk(scores[:, :200], 10), device_topk(scores[:, 200:], 10, offset=200)
    values, rows = device_topk_merge(a, b, 10)
    want_values, want_rows = topk_rows(scores.numpy(), 10)
    assert np.array_equal(rows.numpy(), want_rows) and np.array_equal(values.numpy(), want_values)


@pytest.mark.parametrize("score", [None, ScoreConfig(0.1, 0.5, "image"), ScoreConfig(0.05, 0.3, "text")],
                         ids=["plain", "image", "text"])
def test_the_device_scan_logic_on_the_cpu(tmp_path, monkeypatch, score):
    """The GPU scan's block path (device top-k per block, deleted rows masked, one host copy for all segments)
    run with CPU tensors equals the host scan, deletes included (a GPU run found it broken with deletes)."""
    index = _index(tmp_path, 1500)
    t = _unit(5, 64, seed=6)
    want = index.search_images(t, 15, score=score, exact=True)
    monkeypatch.setattr(Placement, "on_device", property(lambda self: True))
    got = index.search_images(t, 15, score=score, exact=True)
    for a, b in zip(want, got):
        assert np.array_equal(a.rows, b.rows) and np.array_equal(a.positions, b.positions)
        assert np.allclose(a.scores, b.scores, atol=1e-5)


# ------------------------------------------------------------------------------------------ compiled buckets
def test_compiled_buckets_compile_once_per_bucket_and_slice_big_batches():
    compiled: list[int] = []
    module = torch.nn.Linear(3, 2)

    def fake_compile(m):
        compiled.append(1)
        return m

    buckets = CompiledBuckets(module, max_bucket=16, compile=fake_compile)
    x = torch.randn(50, 3)
    for n in (1, 3, 4, 9, 16, 50, 3, 50):
        assert torch.allclose(buckets(x[:n]), module(x[:n]), atol=1e-6)
    assert sorted(buckets.compiled) == [1, 2, 4, 16]  # 50 ran as 16 + 16 + 16 + 2
    assert len(compiled) == 4
    with pytest.raises(InputError, match="max_bucket"):
        CompiledBuckets(module, max_bucket=12)


# --------------------------------------------------------------------------------------------- device views
def _photo(width: int, height: int, seed: int) -> Image.Image:
    """A smooth photo-like image (gradients plus mild noise): what JPEG and resizing are made for."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(x / (40 + 10 * c) + y / 57 + c) for c in range(3)], axis=-1)
    noisy = base + rng.normal(0, 6, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _pil_views(data: bytes, resolution: int, crops: CropConfig, seed: int) -> torch.Tensor:
    from engine.laclip import crop_boxes

    transform = ImageTransform(resolution)
    image = load_image(data)
    boxes = crop_boxes(image.width, image.height, crops, seed)
    return transform.normalise(torch.cat([transform.resized(image)[None], transform.resized_crops(image, boxes)]))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_device_views_match_the_pil_path(device):
    grid = CropConfig(num_crops=4, crop_mode="grid")
    maker = DeviceViewMaker(64, grid, device=device)
    blobs = [_jpeg(_photo(160, 120, 0)), _jpeg(_photo(97, 203, 1))]
    png = io.BytesIO()
    _photo(80, 60, 2).save(png, format="PNG")
    blobs.append(png.getvalue())  # not a JPEG: decoded by PIL, resized on the device
    made = maker(blobs, thumbnails=True)
    assert made.views.shape == (3, 5, 3, 64, 64) and made.views.device.type == device
    for i, blob in enumerate(blobs):
        ref = _pil_views(blob, 64, grid, 0)
        got = made.views[i].cpu()
        cos = torch.nn.functional.cosine_similarity(got.flatten(1), ref.flatten(1)).min().item()
        assert cos > 0.995, f"image {i}: views differ from the PIL path (min cosine {cos:.4f})"
        assert (got - ref).abs().mean().item() < 0.03
    assert all(Image.open(io.BytesIO(t)).size[0] <= 256 for t in made.thumbnails)


def test_device_views_seed_random_crops_by_file_bytes_and_name_bad_input():
    random = CropConfig(num_crops=3)
    maker = DeviceViewMaker(32, random, device="cpu")
    blob = _jpeg(_photo(120, 90, 3))
    a, b = maker([blob]).views, maker([blob]).views
    assert torch.equal(a, b)  # the same file always gets the same crops
    other = maker([_jpeg(_photo(120, 90, 4))]).views
    assert not torch.equal(a[0, 1:], other[0, 1:])
    assert file_seed(blob) == file_seed(bytes(blob)) and file_seed(blob) != file_seed(blob + b"\0")
    with pytest.raises(ImageDecodeError, match="bytes"):
        maker([b"\xff\xd8\xff not really a jpeg"])


# ------------------------------------------------------------------------------------------------ CUDA cases
def _index(tmp_path, n: int, d: int = 64, k: int = 4, dtype: str = "float16") -> Index:
    manifest = IndexManifest("synthetic", "gpu-test", d, LaclipConfig(num_crops=k), dtype=dtype,
                             ann=AnnConfig(kind="none"))
    index = Index.create(tmp_path / "idx", manifest)
    index.add_images(list(range(n)), _unit(n, d, seed=1), _unit(n, k, d, seed=2))
    index.add_images(list(range(n, n + 300)), _unit(300, d, seed=3), _unit(300, k, d, seed=4))
    index.delete_images([3, 4, n + 7])
    return index


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("score", [None, ScoreConfig(0.1, 0.5, "image"), ScoreConfig(0.05, 0.3, "text")],
                         ids=["plain", "image", "text"])
def test_device_scan_equals_the_host_scan(tmp_path, score):
    """Before residency (blocks streamed, top-k on the device) and after (the kernel's fused top-k), the GPU
    returns the host's rows for every query, deleted rows excluded."""
    cpu = _index(tmp_path, 2000)
    gpu = Index.open(tmp_path / "idx", device="cuda")
    t = _unit(9, 64, seed=5)
    t[0] = cpu.snapshot().array("image_global")[10]  # a query close to one image: an unambiguous top hit
    want = cpu.search_images(t, 20, score=score, exact=True)
    for phase in ("streamed", "resident"):
        got = gpu.search_images(t, 20, score=score, exact=True)
        for a, b in zip(want, got):
            assert np.allclose(a.scores, b.scores, atol=2e-3), phase
            assert len(set(a.rows.tolist()) & set(b.rows.tolist())) >= 19, phase
        gpu.place.resident.wait()


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("weights", ["image", "text"])
def test_cuda_kernel_paths_agree(dtype, weights):
    """The tensor-core, small and generic CUDA kernels on the same rows (an unaligned view forces generic)."""
    gen = torch.Generator().manual_seed(0)
    n, k, d = 1000, 4, 512
    g = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=-1).to("cuda", dtype)
    c = torch.nn.functional.normalize(torch.randn(n, k, d, generator=gen), dim=-1).to("cuda", dtype)
    t = torch.nn.functional.normalize(torch.randn(40, d, generator=gen), dim=-1).to("cuda", dtype)
    wide = torch.zeros(n * (k + 1) * d + 1, device="cuda", dtype=dtype)
    g_un = wide[1:1 + n * d].view(n, d)
    c_un = wide[1 + n * d:1 + n * d + n * k * d].view(n, k, d)
    g_un.copy_(g), c_un.copy_(c)
    for alpha in (0.5, 1.0):
        kw = dict(alpha=alpha, tau=0.1, weights=weights)
        many = ops.laclip_scores(t, g, c, **kw)  # Q = 40: tensor cores (text/plain) or small Q=8 passes
        few = torch.cat([ops.laclip_scores(t[i:i + 1], g, c, **kw) for i in range(40)])  # Q = 1 small kernel
        generic = ops.laclip_scores(t, g_un, c_un, **kw)
        assert torch.allclose(many, few, atol=1e-5) and torch.allclose(many, generic, atol=1e-5)


@CUDA
@pytest.mark.cuda
def test_bf16_compiled_text_tower_runs_on_cuda():
    from engine.backends.torch_backend import TorchEncoder
    from engine.models import build_random_model, get_spec

    model = build_random_model(get_spec("tiny"))
    ids = torch.tensor([[101, 2000, 3000, 102, 0, 0], [101, 4000, 102, 0, 0, 0]])
    ref = TorchEncoder(model, get_spec("tiny").input_resolution, device="cuda").encode_texts(ids)
    fast = TorchEncoder(model, get_spec("tiny").input_resolution, device="cuda",
                        precision="bf16-compiled").encode_texts(ids)
    assert (ref * fast).sum(1).min() >= 0.99


# ----------------------------------------------------------------------------------------- retriever wiring
def test_retriever_indexes_through_device_views_alike():
    """views="device" (here on the CPU) indexes the same images as the PIL path, vector for vector; a bad choice of
    views is an InputError naming it; "auto" keeps PIL for a CPU encoder."""
    from engine import Retriever

    grid = LaclipConfig(num_crops=4, crop_mode="grid")
    blobs = [_jpeg(_photo(200, 150, 7)), _jpeg(_photo(90, 130, 8))]
    pil = Retriever.from_checkpoint(None, "tiny", random_weights=True, laclip=grid, progress=False, views="pil")
    dev = Retriever.from_checkpoint(None, "tiny", random_weights=True, laclip=grid, progress=False, views="device")
    auto = Retriever.from_checkpoint(None, "tiny", random_weights=True, laclip=grid, progress=False)
    assert dev.device_views is not None and pil.device_views is None and auto.device_views is None
    a, b = pil.encode_image_views(blobs), dev.encode_image_views(blobs)
    assert (a.global_ * b.global_).sum(-1).min() > 0.999
    assert (a.crops * b.crops).sum(-1).min() > 0.999
    ids = dev.add_images(blobs)
    assert dev.thumbnail(ids[0]) is not None
    with pytest.raises(InputError, match="views"):
        Retriever.from_checkpoint(None, "tiny", random_weights=True, views="gpu")


def test_the_index_scores_where_the_encoder_runs():
    """A torch or TensorRT encoder names its device; an ONNX Runtime encoder on the CUDA provider means "cuda"
    (the index of Retriever.from_export(..., device="cuda") scored on the CPU before)."""
    from types import SimpleNamespace

    from engine.backends.base import encoder_device

    assert encoder_device(SimpleNamespace(device=torch.device("cuda", 0))) == "cuda:0"
    assert encoder_device(SimpleNamespace(providers=["CUDAExecutionProvider", "CPUExecutionProvider"])) == "cuda"
    assert encoder_device(SimpleNamespace(providers=["CPUExecutionProvider"])) == "cpu"
    assert encoder_device(SimpleNamespace()) == "cpu"
