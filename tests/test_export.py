"""Export (ONNX fp32/fp16/int8, parity gate, manifest), the ONNX Runtime backend, and TensorRT rebuild rules."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import SAMPLE_TEXTS
from engine import CheckpointError, IndexFormatError, InputError, LaclipConfig, Retriever
from engine.backends.base import trim_padding
from engine.index import Index
from engine.models import build_random_model, file_sha256, get_spec, load_model, save_checkpoint
from engine.preprocess import Tokenizer
from export import THRESHOLDS, ParityError, export_model, load_manifest
from engine.backends.export_manifest import MANIFEST_NAME
from export.onnx_export import ONNXRUNTIME_OPSET, TENSORRT_OPSET, build_towers
from engine.backends.tensorrt_engines import CONFIG_NAME, ENGINE_FILES, BuildEnvironment, ProfileConfig, rebuild_reason

ROOT = Path(__file__).resolve().parents[1]


def _has_tensorrt() -> bool:
    try:
        import tensorrt
    except ImportError:
        return False
    return int(tensorrt.__version__.split(".")[0]) >= 10


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_tensorrt = pytest.mark.skipif(not (_has_tensorrt() and torch.cuda.is_available()),
                                    reason="needs the tensorrt package (>= 10) and a CUDA GPU")


@pytest.fixture(scope="module")
def exports(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny checkpoint exported once per precision."""
    root = tmp_path_factory.mktemp("exports")
    return {p: (export_model("tiny", root / p, tiny_checkpoint, precision=p), root / p)[1]
            for p in ("fp32", "fp16", "int8")}


@pytest.fixture()
def fp32_copy(exports: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the fp32 export that a test may damage."""
    return Path(shutil.copytree(exports["fp32"], tmp_path / "export"))


# ---- export output ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_manifest_records_identity_shapes_and_passing_parity(exports, tiny_checkpoint, precision):
    manifest = load_manifest(exports[precision], model="tiny")
    assert manifest.checkpoint_hash == file_sha256(tiny_checkpoint)
    assert (manifest.precision, manifest.embed_dim, manifest.input_resolution) == (precision, 32, 224)
    assert manifest.opset == ONNXRUNTIME_OPSET
    assert manifest.vision.input_shape == ["batch", 3, 224, 224]
    assert manifest.text.input_shape == ["batch", "sequence"]
    assert manifest.parity["threshold"] == THRESHOLDS[precision]
    for tower in ("vision", "text"):
        stats = manifest.parity[tower]["generated"]
        assert stats["count"] >= 8
        assert THRESHOLDS[precision] <= stats["min"] <= stats["mean"] <= 1 + 1e-9


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_onnx_files_have_named_dynamic_io_and_identity(exports, precision):
    manifest = load_manifest(exports[precision])
    for tower, entry, dynamic in (("vision", manifest.vision, [0]), ("text", manifest.text, [0, 1])):
        model = onnx.load(str(exports[precision] / entry.file), load_external_data=False)
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == ONNXRUNTIME_OPSET
        (inp,), (out,) = model.graph.input, model.graph.output
        assert (inp.name, out.name) == (entry.input_name, entry.output_name)
        dims = inp.type.tensor_type.shape.dim
        assert [i for i, d in enumerate(dims) if d.dim_param] == dynamic
        assert inp.type.tensor_type.elem_type == (onnx.TensorProto.FLOAT if tower == "vision"
                                                  else onnx.TensorProto.INT64)
        assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert {p.key: p.value for p in model.metadata_props} == manifest.metadata(tower)


def test_fp16_keeps_layernorm_in_fp32(exports):
    manifest = load_manifest(exports["fp16"])
    model = onnx.load(str(exports["fp16"] / manifest.text.file))
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    norms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert norms
    for node in norms:
        assert all(types.get(name) == onnx.TensorProto.FLOAT for name in node.input if name), node.name
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_int8_quantises_every_weight_matmul(exports, tower):
    model = onnx.load(str(exports["int8"] / f"{tower}.onnx"))
    weights = {i.name: i.data_type for i in model.graph.initializer}
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in model.graph.node)
    float_weight_matmuls = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm")
                            and weights.get(n.input[1]) == onnx.TensorProto.FLOAT]
    assert float_weight_matmuls == []


def test_unpadded_text_equals_padded_torch_reference(exports, tiny_checkpoint):
    """Dynamic length: the exported text tower on trimmed ids equals cn_clip on ids padded to 52."""
    clip = load_model(tiny_checkpoint, "tiny").model
    padded = Tokenizer(52)(["猫", "敦煌壁画中的飞天", "床前明月光，疑是地上霜"]).ids
    trimmed = trim_padding(padded.numpy())
    assert trimmed.shape[1] < 20
    session = ort.InferenceSession(str(exports["fp32"] / "text.onnx"), providers=["CPUExecutionProvider"])
    short = session.run(None, {"input_ids": trimmed})[0]
    full = session.run(None, {"input_ids": padded.numpy()})[0]
    with torch.inference_mode():
        reference = clip.encode_text(padded).numpy()
    np.testing.assert_allclose(short, reference, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(short, full, rtol=1e-4, atol=1e-5)


def _ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


def test_onnxruntime_export_has_one_attention_node_per_layer(exports):
    config = get_spec("tiny").config()
    for tower, layers in (("vision", config["vision_layers"]), ("text", config["text_num_hidden_layers"])):
        ops = _ops(exports["fp32"] / f"{tower}.onnx")
        assert ops.count("Attention") == layers, (tower, ops)
        assert "Softmax" not in ops


def test_tensorrt_opset_graph_matches_reference(tiny_checkpoint, tmp_path):
    """The opset-18 graph built for TensorRT (attention as MatMul/Softmax/MatMul) is checked here on ONNX Runtime."""
    clip = load_model(tiny_checkpoint, "tiny").model
    files = build_towers(clip, 224, 52, "fp32", tmp_path, opset=TENSORRT_OPSET)
    assert "Attention" not in _ops(files.vision) + _ops(files.text)
    pixels = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    ids = Tokenizer(52)(SAMPLE_TEXTS[:4]).ids
    with torch.inference_mode():
        want = {"vision": clip.encode_image(pixels).numpy(), "text": clip.encode_text(ids).numpy()}
    got = {"vision": ort.InferenceSession(str(files.vision)).run(None, {"pixel_values": pixels.numpy()})[0],
           "text": ort.InferenceSession(str(files.text)).run(None, {"input_ids": ids.numpy()})[0]}
    for tower in ("vision", "text"):
        np.testing.assert_allclose(got[tower], want[tower], rtol=1e-4, atol=1e-5, err_msg=tower)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_towers_over_the_size_limit_keep_weights_in_a_side_file(tiny_checkpoint, tmp_path, monkeypatch, precision):
    """Protobuf caps a file at 2 GB (ViT-H-14's image tower is 2.5 GB): above the limit weights go to a .data file."""
    monkeypatch.setattr("export.onnx_export.EXTERNAL_DATA_BYTES", 10_000)  # the tiny towers are ~0.3-6 MB
    manifest = export_model("tiny", tmp_path / "big", tiny_checkpoint, precision=precision)
    for tower in (manifest.vision, manifest.text):
        onnx_file = tmp_path / "big" / tower.file
        side_files = [f for f in (tmp_path / "big").iterdir() if f.name.startswith(onnx_file.name) and f != onnx_file]
        assert side_files and sum(f.stat().st_size for f in side_files) > 4 * onnx_file.stat().st_size
    moved = Path(shutil.move(tmp_path / "big", tmp_path / "moved"))  # side files are found relative to the .onnx
    served = Retriever.from_export(moved).encode_texts(SAMPLE_TEXTS)
    reference = Retriever.from_checkpoint(tiny_checkpoint, model="tiny").encode_texts(SAMPLE_TEXTS)
    assert (served * reference).sum(axis=1).min() >= THRESHOLDS[precision]


@pytest.mark.slow
def test_vit_h_14_exports_with_external_data(tmp_path):
    """The real size case: random ViT-H-14 weights (image tower 2.5 GB in fp32), fp32 export, parity gate."""
    checkpoint = tmp_path / "vit-h-14.pt"
    save_checkpoint(build_random_model(get_spec("ViT-H-14")), checkpoint)
    manifest = export_model("ViT-H-14", tmp_path / "out", checkpoint, precision="fp32")
    assert (tmp_path / "out" / "vision.onnx").stat().st_size < 100_000_000
    assert manifest.parity["vision"]["generated"]["min"] >= THRESHOLDS["fp32"]


def test_trim_padding_keeps_the_longest_row_and_a_minimum_length():
    ids = np.array([[101, 7, 102, 0, 0], [101, 7, 8, 102, 0]])
    assert trim_padding(ids).tolist() == [[101, 7, 102, 0], [101, 7, 8, 102]]
    assert trim_padding(np.zeros((2, 5), np.int64)).shape == (2, 2)
    assert trim_padding(np.array([[5, 0, 0]])).tolist() == [[5, 0]]


# ---- serving ------------------------------------------------------------------------------------------------

def _search_all(retriever: Retriever, image_dir: Path):
    images = sorted(image_dir.iterdir())
    retriever.add_images(images)
    retriever.add_texts(SAMPLE_TEXTS)
    return retriever.search_images(SAMPLE_TEXTS, k=5), retriever.search_texts(images[:3], k=3)


def _assert_same_hits(a, b, atol):
    for row_a, row_b in zip(a, b):
        assert [h.id for h in row_a] == [h.id for h in row_b]
        np.testing.assert_allclose([h.score for h in row_a], [h.score for h in row_b], atol=atol)


@pytest.mark.parametrize("laclip", [None, LaclipConfig()], ids=["global", "laclip"])
def test_from_export_search_equals_from_checkpoint(exports, tiny_checkpoint, image_dir, laclip):
    torch_hits = _search_all(Retriever.from_checkpoint(tiny_checkpoint, model="tiny", laclip=laclip), image_dir)
    onnx_hits = _search_all(Retriever.from_export(exports["fp32"], laclip=laclip,
                                                  backend_options={"intra_op_num_threads": 1}), image_dir)
    for ours, theirs in zip(onnx_hits, torch_hits):
        _assert_same_hits(ours, theirs, atol=1e-4)


def test_index_from_torch_backend_is_accepted_by_export(exports, tiny_checkpoint, image_dir, tmp_path):
    reference = Retriever.from_checkpoint(tiny_checkpoint, model="tiny")
    expected = _search_all(reference, image_dir)[0]
    reference.save(tmp_path / "index")
    served = Retriever.from_export(exports["fp32"])
    served.attach(Index.load(tmp_path / "index"))
    _assert_same_hits(served.search_images(SAMPLE_TEXTS, k=5), expected, atol=1e-4)


def test_index_from_other_weights_is_refused(exports, image_dir, tmp_path):
    other = Retriever.from_checkpoint(None, model="tiny")  # random weights: another checkpoint hash
    other.add_images(sorted(image_dir.iterdir())[:2])
    other.save(tmp_path / "index")
    with pytest.raises(IndexFormatError, match="checkpoint hash"):
        Retriever.from_export(exports["fp32"]).attach(Index.load(tmp_path / "index"))


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_low_precision_exports_serve_close_embeddings(exports, tiny_checkpoint, image_dir, precision):
    images = sorted(image_dir.iterdir())[:4]
    ref = Retriever.from_checkpoint(tiny_checkpoint, model="tiny")
    low = Retriever.from_export(exports[precision])
    cos_img = (ref.encode_images(images) * low.encode_images(images)).sum(1)
    cos_txt = (ref.encode_texts(SAMPLE_TEXTS) * low.encode_texts(SAMPLE_TEXTS)).sum(1)
    assert cos_img.min() >= THRESHOLDS[precision] and cos_txt.min() >= THRESHOLDS[precision]


def test_backend_settings_are_validated(exports):
    with pytest.raises(InputError, match="unknown onnxruntime options"):
        Retriever.from_export(exports["fp32"], backend_options={"threads": 2})
    with pytest.raises(InputError, match="backend must be one of"):
        Retriever.from_export(exports["fp32"], backend="tvm")
    with pytest.raises(InputError, match="optimization"):
        Retriever.from_export(exports["fp32"], backend_options={"optimization": "max"})


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA provider present")
def test_cuda_device_without_cuda_provider_is_a_clear_error(exports):
    with pytest.raises(InputError, match="onnxruntime-gpu"):
        Retriever.from_export(exports["fp32"], device="cuda")


# ---- bad exports ---------------------------------------------------------------------------------------------

def test_missing_onnx_file(fp32_copy):
    (fp32_copy / "text.onnx").unlink()
    with pytest.raises(CheckpointError, match="text.onnx.*missing"):
        Retriever.from_export(fp32_copy)


def test_corrupt_onnx_file(fp32_copy):
    (fp32_copy / "vision.onnx").write_bytes(b"\x08\x07not a protobuf" * 10)
    with pytest.raises(CheckpointError, match="vision.onnx could not be loaded"):
        Retriever.from_export(fp32_copy)


def test_missing_or_corrupt_manifest(fp32_copy, tmp_path):
    with pytest.raises(CheckpointError, match="manifest.json not found"):
        Retriever.from_export(tmp_path)
    (fp32_copy / MANIFEST_NAME).write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match="not a valid export manifest"):
        Retriever.from_export(fp32_copy)


def test_export_of_another_model_is_refused(fp32_copy):
    with pytest.raises(CheckpointError, match="holds model 'tiny', not 'ViT-B-16'"):
        Retriever.from_export(fp32_copy, model="ViT-B-16")
    manifest = json.loads((fp32_copy / MANIFEST_NAME).read_text(encoding="utf-8"))
    manifest["checkpoint_hash"] = "0" * 64  # a manifest that does not belong to these ONNX files
    (fp32_copy / MANIFEST_NAME).write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(CheckpointError, match="cnclip.checkpoint_hash"):
        Retriever.from_export(fp32_copy)


def test_failed_parity_raises_with_figures_and_writes_nothing(tiny_checkpoint, tmp_path):
    with pytest.raises(ParityError, match=r"vision/generated: min [01]\.\d{8} mean"):
        export_model("tiny", tmp_path / "out", tiny_checkpoint, min_cosine=1.5)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_export_rejects_bad_arguments(tiny_checkpoint, tmp_path):
    with pytest.raises(InputError, match="precision"):
        export_model("tiny", tmp_path / "a", tiny_checkpoint, precision="int4")
    with pytest.raises(InputError, match="precision for tensorrt"):
        export_model("tiny", tmp_path / "a", tiny_checkpoint, fmt="tensorrt", precision="int8")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not an export directory"):
        export_model("tiny", tmp_path / "file", tiny_checkpoint)
    with pytest.raises(CheckpointError, match="not found"):
        export_model("tiny", tmp_path / "b", tmp_path / "missing.pt")


# ---- CLI -----------------------------------------------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "export", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_exports_with_user_images_and_texts(tiny_checkpoint, image_dir, tmp_path):
    texts = tmp_path / "texts.jsonl"   # JSON lines, as every other command reads texts
    texts.write_text("".join(json.dumps({"text_id": i, "text": t}, ensure_ascii=False) + "\n"
                             for i, t in enumerate(SAMPLE_TEXTS)) + "\n", encoding="utf-8")
    out = tmp_path / "int8"
    done = _cli("--model", "tiny", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--format", "onnx",
                "--precision", "int8", "--images", str(image_dir), "--texts", str(texts))
    assert done.returncode == 0, done.stderr
    parity = load_manifest(out).parity
    assert parity["vision"]["user"]["count"] == 12 and parity["text"]["user"]["count"] == len(SAMPLE_TEXTS)
    assert min(parity[t][s]["min"] for t in ("vision", "text") for s in ("generated", "user")) >= THRESHOLDS["int8"]
    lines = done.stdout.splitlines()   # a short report that says which precision it chose, not a JSON dump
    assert lines[0] == f"exported tiny to {out}: precision int8 (as asked)" and len(lines) == 3
    assert lines[1].startswith("parity, min cosine vs fp32 PyTorch: vision 0.9") and "threshold 0.99" in lines[1]


def test_cli_texts_are_json_lines_and_plain_lines_are_refused_by_line(tiny_checkpoint, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(SAMPLE_TEXTS), encoding="utf-8")
    out = tmp_path / "x"
    done = _cli("--model", "tiny", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--texts", str(texts))
    assert done.returncode == 1 and not out.exists()
    assert done.stderr.startswith('error: --texts takes JSON lines {"text": ...}') and f"{texts} line 1" in done.stderr


def test_cli_reports_errors_without_traceback(tiny_checkpoint, tmp_path):
    done = _cli("--model", "tiny", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "x"),
                "--format", "tensorrt", "--precision", "int8")
    assert done.returncode == 1
    assert done.stderr.startswith("error: precision for tensorrt") and "Traceback" not in done.stderr


# ---- TensorRT ------------------------------------------------------------------------------------------------

def _engine_dir(tmp_path: Path, env: BuildEnvironment, manifest, profile: ProfileConfig) -> Path:
    engine_dir = tmp_path / "tensorrt"
    engine_dir.mkdir()
    for name in ENGINE_FILES.values():
        (engine_dir / name).write_bytes(b"plan")
    config = {"tensorrt_version": env.tensorrt_version, "gpu_name": env.gpu_name, "precision": manifest.precision,
              "checkpoint_hash": manifest.checkpoint_hash, "profile": profile.__dict__}
    (engine_dir / CONFIG_NAME).write_text(json.dumps(config), encoding="utf-8")
    return engine_dir


def test_tensorrt_engines_are_rebuilt_for_another_gpu_or_version(exports, tmp_path):
    manifest = load_manifest(exports["fp32"])
    env, profile = BuildEnvironment("10.9.0", "NVIDIA H100 80GB HBM3"), ProfileConfig()
    engine_dir = _engine_dir(tmp_path, env, manifest, profile)
    assert rebuild_reason(engine_dir, env, manifest, profile) is None
    assert "gpu_name" in rebuild_reason(engine_dir, BuildEnvironment("10.9.0", "NVIDIA A10"), manifest, profile)
    assert "tensorrt_version" in rebuild_reason(engine_dir, BuildEnvironment("10.13.0", env.gpu_name),
                                                manifest, profile)
    assert "profile" in rebuild_reason(engine_dir, env, manifest, ProfileConfig(max_batch=128))
    (engine_dir / ENGINE_FILES["text"]).unlink()
    assert "missing engine files" in rebuild_reason(engine_dir, env, manifest, profile)
    (engine_dir / CONFIG_NAME).write_text("{", encoding="utf-8")
    assert "unreadable" in rebuild_reason(engine_dir, env, manifest, profile)
    (engine_dir / CONFIG_NAME).unlink()
    assert "no config.json" in rebuild_reason(engine_dir, env, manifest, profile)


def test_tensorrt_profiles_must_be_ordered():
    with pytest.raises(InputError, match="min_batch <= opt_batch"):
        ProfileConfig(min_batch=8, opt_batch=4)
    with pytest.raises(InputError, match="min_sequence"):
        ProfileConfig(min_sequence=1)


@pytest.mark.skipif(_has_tensorrt() and torch.cuda.is_available(), reason="tensorrt and a GPU are present")
def test_tensorrt_backend_absent_is_a_clear_error(exports):
    with pytest.raises(InputError, match="tensorrt|CUDA GPU"):
        Retriever.from_export(exports["fp32"], backend="tensorrt", device="cuda")


@needs_tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_export_serves_like_torch(tiny_checkpoint, image_dir, tmp_path, precision):
    manifest = export_model("tiny", tmp_path / "trt", tiny_checkpoint, fmt="tensorrt", precision=precision)
    assert manifest.parity["backend"] == "tensorrt"
    config = json.loads((tmp_path / "trt" / "tensorrt" / CONFIG_NAME).read_text())
    assert config["gpu_name"] == torch.cuda.get_device_name()
    served = Retriever.from_export(tmp_path / "trt", backend="tensorrt", device="cuda")
    ref = Retriever.from_checkpoint(tiny_checkpoint, model="tiny")
    images = sorted(image_dir.iterdir())
    cos = (served.encode_images(images) * ref.encode_images(images)).sum(1)
    assert cos.min() >= THRESHOLDS[precision]


# ---- CUDA ----------------------------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_torch_backend_low_precision_on_cuda(tiny_checkpoint, image_dir, precision):
    images = sorted(image_dir.iterdir())
    ref = Retriever.from_checkpoint(tiny_checkpoint, model="tiny")
    fast = Retriever.from_checkpoint(tiny_checkpoint, model="tiny", device="cuda", precision=precision)
    assert (ref.encode_images(images) * fast.encode_images(images)).sum(1).min() >= 0.99
    assert (ref.encode_texts(SAMPLE_TEXTS) * fast.encode_texts(SAMPLE_TEXTS)).sum(1).min() >= 0.99


@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available(),
                    reason="needs onnxruntime-gpu and a CUDA GPU")
def test_onnxruntime_cuda_provider(exports, tiny_checkpoint, image_dir):
    served = Retriever.from_export(exports["fp32"], device="cuda")
    assert served.encoder.providers[0] == "CUDAExecutionProvider"
    ref = Retriever.from_checkpoint(tiny_checkpoint, model="tiny")
    images = sorted(image_dir.iterdir())
    assert (served.encode_images(images) * ref.encode_images(images)).sum(1).min() >= 0.9999
