"""The OpenVINO rows of bench_towers (benchmarks.towers_openvino): OpenVINO on the engine's own exports must match
fp32 PyTorch at each precision's gate; rows that cannot run here are skipped with the reason, never dropped."""
from __future__ import annotations

import pytest

from benchmarks.towers_openvino import ROWS, openvino_encoders
from conftest import SAMPLE_TEXTS
from engine.backends import TorchEncoder
from engine.backends import openvino_backend
from engine.backends.export_reader import load_manifest
from engine.models import load_model
from engine.preprocess import Tokenizer
from export import THRESHOLDS, export_model
from export.parity import generated_pixels, row_cosines

OPENVINO = openvino_backend.import_openvino()
needs_openvino = pytest.mark.skipif(OPENVINO is None, reason='openvino is not installed (pip install --no-build-isolation -e ".[openvino]")')


def test_without_openvino_every_row_is_skipped_with_the_install_hint(monkeypatch):
    monkeypatch.setattr(openvino_backend, "import_openvino", lambda: None)
    encoders, skipped = openvino_encoders(None, {}, 2)
    assert encoders == {} and set(skipped) == set(ROWS)
    assert all("pip install" in why for why in skipped.values())


@needs_openvino
def test_openvino_rows_match_fp32_pytorch_at_their_gates(tmp_path):
    out = tmp_path / "auto"
    export_model("tiny", out, None, precision="auto")
    selection = load_manifest(out).selection
    encoders, skipped = openvino_encoders(out, selection, 2)
    assert set(encoders) | set(skipped) == set(ROWS) and not set(encoders) & set(skipped)
    assert "openvino-fp32" in encoders
    bf16 = "BF16" in OPENVINO.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert ("openvino-bf16" in encoders) == bf16
    ref = TorchEncoder(load_model(None, "tiny").model, 224)
    pixels = generated_pixels(224, count=3, seed=31)
    ids = Tokenizer(52)(SAMPLE_TEXTS).ids
    want_images, want_texts = ref.encode_images(pixels), ref.encode_texts(ids)
    gates = {row: THRESHOLDS[gate] for row, gate in openvino_backend.GATE_PRECISION.items()}
    for row, encoder in encoders.items():
        assert row_cosines(encoder.encode_images(pixels), want_images).min() >= gates[row], row
        assert row_cosines(encoder.encode_texts(ids), want_texts).min() >= gates[row], row
