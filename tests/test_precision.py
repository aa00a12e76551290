"""Precisions beyond fp32 and their choice: static int8 (QDQ), bf16 on CPU, `--precision auto` and choose_precision,
the engine-side export reader, and ONNX Runtime's CUDA provider checks (with a fake session: no GPU needed)."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from conftest import SAMPLE_TEXTS
from engine import InputError, Retriever
from engine.backends import TorchEncoder, cpu_features, export_reader, onnx_backend
from engine.backends.export_manifest import MANIFEST_NAME
from engine.backends.export_reader import choose_precision, load_manifest, open_encoder
from engine.backends.torch_backend import batch_bucket
from engine.errors import CheckpointError
from engine.models import load_model
from engine.preprocess import Tokenizer
from export import THRESHOLDS, export_model
from export.parity import generated_pixels, row_cosines

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def auto_export(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint exported with --precision auto (every candidate built, gated and timed)."""
    out = tmp_path_factory.mktemp("auto") / "export"
    export_model("tiny", out, tiny_checkpoint, precision="auto")
    return out


def _reference(tiny_checkpoint: Path, pixels, ids):
    clip = load_model(tiny_checkpoint, "tiny").model.eval()
    encoder = TorchEncoder(clip, 224)
    return encoder.encode_images(pixels), encoder.encode_texts(ids)


# ---- static int8 -------------------------------------------------------------------------------------------

def test_static_int8_is_a_calibrated_qdq_graph_within_parity(tiny_checkpoint, image_dir, tmp_path):
    manifest = export_model("tiny", tmp_path / "s8", tiny_checkpoint, precision="int8-static", images=image_dir)
    for tower in ("vision", "text"):
        model = onnx.load(str(tmp_path / "s8" / f"{tower}.onnx"))
        ops = {n.op_type for n in model.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops, tower
        int8_weights = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
        assert int8_weights, tower
    assert manifest.parity["vision"]["user"]["count"] == 12
    assert min(s["min"] for t in ("vision", "text") for s in manifest.parity[t].values()) >= THRESHOLDS["int8-static"]
    encoder, _ = open_encoder(tmp_path / "s8")  # inputs the calibration and the gate did not see
    pixels = generated_pixels(224, count=4, seed=11)
    ids = Tokenizer(52)(SAMPLE_TEXTS).ids
    want_images, want_texts = _reference(tiny_checkpoint, pixels, ids)
    assert row_cosines(encoder.encode_images(pixels), want_images).min() >= THRESHOLDS["int8-static"]
    assert row_cosines(encoder.encode_texts(ids), want_texts).min() >= THRESHOLDS["int8-static"]


# ---- bf16 on CPU -------------------------------------------------------------------------------------------

def test_torch_bf16_on_cpu_passes_the_bf16_gate(tiny_checkpoint):
    """bf16 autocast on CPU (fast with AMX / AVX512-BF16, correct on any CPU) against the fp32 reference."""
    clip = load_model(tiny_checkpoint, "tiny").model
    pixels = generated_pixels(224, count=4, seed=3)
    ids = Tokenizer(52)(SAMPLE_TEXTS).ids
    want_images, want_texts = _reference(tiny_checkpoint, pixels, ids)
    bf16 = TorchEncoder(clip, 224, precision="bf16")
    assert row_cosines(bf16.encode_images(pixels), want_images).min() >= THRESHOLDS["bf16"]
    assert row_cosines(bf16.encode_texts(ids), want_texts).min() >= THRESHOLDS["bf16"]
    with pytest.raises(InputError, match="fp16.*CUDA"):
        TorchEncoder(clip, 224, precision="fp16")


def test_batch_buckets_are_few_and_cover_every_size():
    sizes = range(1, 65)
    buckets = {batch_bucket(n) for n in sizes}
    assert buckets == {1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64}
    assert all(n <= batch_bucket(n) < 2 * n or n == 1 for n in sizes)
    with pytest.raises(InputError, match="batch size"):
        batch_bucket(0)


def test_torch_bf16_compiled_passes_the_bf16_gate_on_padded_batches(tiny_checkpoint):
    """bf16 weights with the vision tower compiled per batch bucket: batches of 3 (padded to 4) and 1 against the
    fp32 reference, on inputs the compiler never saw; the padding rows never reach the output."""
    clip = load_model(tiny_checkpoint, "tiny").model
    pixels = generated_pixels(224, count=4, seed=5)
    ids = Tokenizer(52)(SAMPLE_TEXTS).ids
    want_images, want_texts = _reference(tiny_checkpoint, pixels, ids)
    compiled = TorchEncoder(clip, 224, precision="bf16-compiled")
    got = np.concatenate([compiled.encode_images(pixels[:3]), compiled.encode_images(pixels[3:])])
    assert got.shape == want_images.shape
    assert row_cosines(got, want_images).min() >= THRESHOLDS["bf16"]
    assert row_cosines(compiled.encode_texts(ids), want_texts).min() >= THRESHOLDS["bf16"]
    assert all(p.dtype == torch.float32 for p in clip.parameters())  # the caller's model is left as it was


# ---- --precision auto ----------------------------------------------------------------------------------------

def test_auto_export_records_every_candidate_and_describes_the_fastest(auto_export):
    top = load_manifest(auto_export)
    selection = top.selection
    candidates = selection["candidates"]
    assert set(candidates) == {"fp32", "int8", "int8-static"}
    assert selection["machine"]["model"] == cpu_features.cpu_info().model
    for name, entry in candidates.items():
        assert entry["passed"] and entry["min_cosine"] >= THRESHOLDS[name] == entry["threshold"]
        assert 0 < entry["vision_s"] and 0 < entry["text_s"]
        assert entry["seconds"] == pytest.approx(entry["vision_s"] + entry["text_s"])
        assert load_manifest(auto_export / entry["directory"]).precision == name
    fastest = min(candidates, key=lambda n: candidates[n]["seconds"])
    assert selection["chosen"] == top.precision == fastest == choose_precision(auto_export)
    assert top.vision.file == f"{fastest}/vision.onnx"


def test_auto_export_serves_the_chosen_or_a_named_precision(auto_export, tiny_checkpoint):
    pixels = generated_pixels(224, count=3, seed=9)
    ids = Tokenizer(52)(SAMPLE_TEXTS).ids
    want_images, want_texts = _reference(tiny_checkpoint, pixels, ids)
    for precision in ("fp32", "int8-static"):
        encoder, manifest = open_encoder(auto_export, precision=precision)
        assert manifest.precision == precision
        assert row_cosines(encoder.encode_images(pixels), want_images).min() >= THRESHOLDS[manifest.precision]
        assert row_cosines(encoder.encode_texts(ids), want_texts).min() >= THRESHOLDS[manifest.precision]
    encoder, manifest = open_encoder(auto_export)  # each tower's own choice (tests/test_auto_precision.py)
    assert row_cosines(encoder.encode_images(pixels), want_images).min() >= THRESHOLDS["int8"]
    assert row_cosines(encoder.encode_texts(ids), want_texts).min() >= THRESHOLDS["int8"]
    with pytest.raises(InputError, match="no passing 'fp16'"):
        open_encoder(auto_export, precision="fp16")
    served = Retriever.from_export(auto_export)  # the server's path: each tower's recorded choice
    assert row_cosines(served.encode_texts(SAMPLE_TEXTS), want_texts).min() >= THRESHOLDS["int8"]


def test_auto_export_drops_candidates_that_fail_parity(tiny_checkpoint, tmp_path):
    manifest = export_model("tiny", tmp_path / "strict", tiny_checkpoint, precision="auto", min_cosine=0.99999)
    candidates = manifest.selection["candidates"]
    assert candidates["fp32"]["passed"] and manifest.precision == "fp32"
    for name in ("int8", "int8-static"):
        assert not candidates[name]["passed"] and "fails parity" in candidates[name]["reason"]
        assert not (tmp_path / "strict" / name).exists()
    with pytest.raises(InputError, match="holds no passing 'int8'.*\\['fp32'\\]"):
        open_encoder(tmp_path / "strict", precision="int8")


def _with_selection(auto_export: Path, tmp_path: Path, seconds: dict[str, float], machine: str | None = None) -> Path:
    """A copy of the auto export whose recorded timings (and timing machine) are replaced."""
    copy = Path(shutil.copytree(auto_export, tmp_path / "copy"))
    raw = json.loads((copy / MANIFEST_NAME).read_text(encoding="utf-8"))
    for name, value in seconds.items():
        entry = raw["selection"]["candidates"].setdefault(name, {"directory": "fp32", "passed": True})
        entry["seconds"] = value
    if machine is not None:
        raw["selection"]["machine"]["model"] = machine
    (copy / MANIFEST_NAME).write_text(json.dumps(raw), encoding="utf-8")
    return copy


def test_choose_precision_skips_bf16_on_a_cpu_without_bf16_units(auto_export, tmp_path, monkeypatch):
    copy = _with_selection(auto_export, tmp_path, {"bf16": 0.001, "fp32": 0.5, "int8": 0.2, "int8-static": 0.3})
    monkeypatch.setattr(export_reader, "cpu_info", lambda: cpu_features.CpuInfo("Old CPU", ("avx2",)))
    assert choose_precision(copy) == "int8"
    monkeypatch.setattr(export_reader, "cpu_info", lambda: cpu_features.CpuInfo("New CPU", ("amx_bf16",)))
    assert choose_precision(copy) == "bf16"


def test_choose_precision_warns_when_timed_on_another_cpu(auto_export, tmp_path, caplog):
    copy = _with_selection(auto_export, tmp_path, {"fp32": 0.5, "int8": 0.2, "int8-static": 0.01},
                           machine="Some Other CPU")  # every candidate recorded: no dependence on this CPU's timings
    with caplog.at_level(logging.WARNING, logger=export_reader.__name__):
        assert choose_precision(copy) == "int8-static"
    assert "timed on Some Other CPU" in caplog.text


def test_cpu_features_are_read_from_this_machine():
    info = cpu_features.cpu_info()
    assert info.model and set(info.flags) <= set(cpu_features.REPORTED_FLAGS)
    assert cpu_features.CpuInfo("x", ("avx512_bf16",)).bf16 and not cpu_features.CpuInfo("x", ("avx2",)).bf16
    assert cpu_features.CpuInfo("x", ("avx512_vnni",)).vnni


# ---- the export reader lives in the engine ---------------------------------------------------------------------

def test_export_reader_does_not_import_the_export_package(auto_export):
    code = ("import sys; from engine.backends.export_reader import open_encoder; "
            f"open_encoder({str(auto_export)!r}); print('export' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_model_none_takes_the_manifests_and_another_is_refused(auto_export):
    assert open_encoder(auto_export)[1].model == "tiny"
    with pytest.raises(CheckpointError, match="holds model 'tiny', not 'RN50'"):
        open_encoder(auto_export, model="RN50")


def test_missing_onnxruntime_names_the_install_command(monkeypatch, auto_export):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    with pytest.raises(InputError, match=r'pip install --no-build-isolation -e "\.\[onnx\]"'):
        open_encoder(auto_export)


# ---- ONNX Runtime CUDA provider (fake sessions) ------------------------------------------------------------------

class _FakeSession:
    """Stands in for onnxruntime.InferenceSession: records its providers, reports `granted` as in use."""

    granted: list[str] = ["CPUExecutionProvider"]
    created: list = []

    def __init__(self, path, options, providers):
        _FakeSession.created.append(providers)

    def get_providers(self):
        return list(self.granted)

    def get_modelmeta(self):
        return type("Meta", (), {"custom_metadata_map": {}})()


@pytest.fixture()
def fake_cuda(monkeypatch):
    """onnxruntime-gpu 'installed' and a GPU 'present'; sessions are fakes."""
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", _FakeSession)
    monkeypatch.setattr(onnx_backend, "gpu_present", lambda: True)
    _FakeSession.created = []
    return _FakeSession


def test_cuda_session_that_fell_back_to_cpu_is_an_error(fake_cuda, auto_export):
    fake_cuda.granted = ["CPUExecutionProvider"]
    with pytest.raises(InputError, match="could not use CUDA.*fell back"):
        onnx_backend.open_session(auto_export / "fp32" / "vision.onnx", onnx_backend.ort_providers("cuda"),
                                  onnx_backend.OrtSettings())
    fake_cuda.granted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    onnx_backend.open_session(auto_export / "fp32" / "vision.onnx", onnx_backend.ort_providers("cuda"),
                              onnx_backend.OrtSettings())


def test_cuda_provider_options_turn_tf32_off_and_use_heuristic_search(fake_cuda):
    (name, options), cpu = onnx_backend.ort_providers("cuda")
    assert name == "CUDAExecutionProvider" and cpu == "CPUExecutionProvider"
    assert options == {"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"}


def test_auto_device_needs_a_gpu_not_only_onnxruntime_gpu(fake_cuda, monkeypatch):
    assert onnx_backend.ort_providers("auto")[0][0] == "CUDAExecutionProvider"
    monkeypatch.setattr(onnx_backend, "gpu_present", lambda: False)
    assert onnx_backend.ort_providers("auto") == ["CPUExecutionProvider"]
    with pytest.raises(InputError, match="no CUDA GPU is visible"):
        onnx_backend.ort_providers("cuda")
    with pytest.raises(InputError, match="device must be"):
        onnx_backend.ort_providers("tpu")


def test_bad_precision_names_are_refused(auto_export, tiny_checkpoint, tmp_path):
    with pytest.raises(InputError, match="precision for onnx must be one of"):
        export_model("tiny", tmp_path / "x", tiny_checkpoint, precision="int4")
    fp32_only = tmp_path / "fp32"
    shutil.copytree(auto_export / "fp32", fp32_only)
    with pytest.raises(InputError, match="holds precision 'fp32' only, not 'int8'"):
        open_encoder(fp32_only, precision="int8")
    assert np.isfinite(open_encoder(fp32_only, precision="fp32")[0].encode_texts(Tokenizer(52)(["猫"]).ids)).all()


def test_a_checkpoint_served_with_precision_auto_runs_each_towers_choice():
    """Retriever.from_checkpoint(..., precision="auto") (engine.serve / engine index --precision auto) times the
    torch precisions this CPU runs and serves each tower's choice; on a GPU it is refused with what to pick."""
    from engine import InputError, Retriever

    auto = Retriever.from_checkpoint(None, "tiny", random_weights=True, precision="auto", progress=False)
    plain = Retriever.from_checkpoint(None, "tiny", random_weights=True, progress=False)
    texts = ["一只猫", "敦煌壁画中的飞天"]
    assert (auto.encode_texts(texts) * plain.encode_texts(texts)).sum(1).min() > 0.99
    assert isinstance(auto.encoder.precision, str) and auto.encoder.precision
    with pytest.raises(InputError, match="auto"):
        Retriever.from_checkpoint(None, "tiny", random_weights=True, precision="auto", device="cuda")
