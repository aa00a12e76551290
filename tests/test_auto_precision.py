"""`--precision auto` per tower (engine.backends.auto_precision): the noise rule on injected timings, the per-tower
choice, the torch candidates on the tiny model with injected timings, the export's per-tower record and what
open_encoder serves from it, and `python -m export --random-weights`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import SAMPLE_TEXTS
from engine import InputError
from engine.backends import TorchEncoder, auto_precision, openvino_backend
from engine.backends.auto_precision import (PerTowerEncoder, TowerCandidate, choose_tower, choose_towers,
                                            summary_line, torch_auto_encoder)
from engine.backends.candidate_timing import TimingPool
from engine.backends.export_reader import choose_towers as served_towers
from engine.backends.export_reader import load_manifest, open_encoder
from engine.models import load_model
from engine.preprocess import Tokenizer
from export import THRESHOLDS, export_model
from export.__main__ import main as export_main
from export.parity import generated_pixels, row_cosines


def cand(name: str, samples: list[float], cosine: float = 1.0, threshold: float = 0.99,
         reason: str | None = None) -> TowerCandidate:
    backend = "torch" if name.startswith("torch-") else "onnxruntime"
    return TowerCandidate(name, backend, name.split("-", 1)[1], list(samples), cosine, threshold, reason)


# ---- the noise rule, on injected timings -------------------------------------------------------------------------

def test_a_difference_inside_the_spread_keeps_the_default():
    default = cand("onnx-fp32", [10.0, 13.0, 11.5])  # median 11.5, spread (median - min) 1.5
    faster = cand("onnx-int8", [10.9, 10.5, 10.7])  # median 10.7: 0.8 faster, inside the spread
    assert default.spread == pytest.approx(1.5)
    assert choose_tower([default, faster]) is default


def test_a_difference_beyond_the_spread_wins():
    default = cand("onnx-fp32", [10.0, 12.0, 11.0])
    faster = cand("onnx-int8", [5.2, 5.0, 5.1])
    assert choose_tower([default, faster]) is faster


def test_the_spread_of_either_candidate_counts():
    """A candidate whose own rounds are noisy must beat the default by more than its own spread too."""
    default = cand("onnx-fp32", [10.0, 10.0, 10.0])  # spread 0
    noisy = cand("onnx-int8", [1.0, 6.0, 9.9, 9.95, 2.0])  # median 6, 4 faster, but spread 5
    steady = cand("onnx-int8-static", [6.0, 6.2, 6.1])  # median 6.1, beyond its spread 0.2
    assert choose_tower([default, noisy, steady]) is steady
    assert choose_tower([default, noisy]) is default


def test_disturbed_calls_do_not_hide_a_winner():
    """Recorded on the AVX2 EPYC (text tower, 5 calls each): two of ONNX fp32's calls stalled (max - min 21 ms,
    interquartile range 19.5 ms, either of which kept it over int8-text, 2.8x faster); median - min ignores them."""
    default = cand("onnx-fp32", [0.043142, 0.041859, 0.022423, 0.022159, 0.022383])
    int8 = cand("torch-int8-text", [0.007924, 0.007878, 0.00789, 0.007871, 0.008167])
    assert default.spread == pytest.approx(0.000264, abs=1e-6)
    assert choose_tower([default, int8]) is int8
    slow_side = cand("torch-int8-text", [0.007924, 0.0219, 0.0220, 0.0221, 0.008167])  # mostly disturbed itself
    assert choose_tower([default, slow_side]) is default


def test_the_lowest_median_among_the_winners():
    default = cand("onnx-fp32", [10.0, 10.1, 10.2])
    a = cand("onnx-int8", [6.0, 6.1, 6.2])
    b = cand("torch-int8-text", [3.0, 3.1, 3.2])
    assert choose_tower([default, a, b]) is b
    assert choose_tower([default, b, a]) is b


def test_failing_or_skipped_candidates_are_never_chosen():
    default = cand("onnx-fp32", [10.0, 10.1, 10.2])
    bad_parity = cand("onnx-int8", [1.0, 1.0, 1.0], cosine=0.95)
    skipped = cand("torch-bf16", [], reason="this CPU has no bf16 units")
    assert choose_tower([default, bad_parity, skipped]) is default
    assert choose_tower([bad_parity, default]) is default  # the first *passing* one is the default
    assert "fails parity" in bad_parity.as_dict()["reason"] and not skipped.passed
    with pytest.raises(InputError, match="no candidate passed parity.*onnx-int8: fails parity"):
        choose_tower([bad_parity, skipped])


def test_each_tower_is_chosen_on_its_own():
    candidates = {
        "vision": [cand("onnx-fp32", [1.00, 1.02, 1.01]), cand("onnx-int8", [0.30, 0.31, 0.32]),
                   cand("onnx-int8-static", [0.45, 0.44, 0.46]), cand("torch-bf16", [], reason="no bf16 units")],
        "text": [cand("onnx-fp32", [0.020, 0.021, 0.022]), cand("onnx-int8", [0.008, 0.009, 0.008]),
                 cand("onnx-int8-static", [0.0085, 0.008, 0.009]), cand("torch-int8-text", [0.004, 0.0042, 0.0041])],
    }
    choices = choose_towers(candidates)
    assert {t: c.name for t, c in choices.items()} == {"vision": "onnx-int8", "text": "torch-int8-text"}
    line = summary_line(choices, candidates)
    assert "\n" not in line
    assert "vision: onnx-int8 310.0 ms" in line and "text: torch-int8-text 4.1 ms" in line
    assert "torch-bf16 -" in line and "onnx-fp32 1010.0" in line


# ---- torch candidates on the tiny model, timings injected ------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return load_model(tiny_checkpoint, "tiny").model.eval()


def test_torch_auto_encoder_chooses_per_tower_from_injected_timings(tiny):
    fake = {("torch-fp32", "vision"): [1.0, 1.1, 1.05], ("torch-fp32", "text"): [0.10, 0.11, 0.105],
            ("torch-bf16", "vision"): [0.5, 0.55, 0.52], ("torch-bf16", "text"): [0.2, 0.21, 0.22],
            ("torch-bf16-compiled", "vision"): [0.3, 0.31, 0.32], ("torch-bf16-compiled", "text"): [0.3, 0.3, 0.3],
            ("torch-int8-text", "text"): [0.02, 0.021, 0.022]}
    timed = []

    def sampler(tower, calls):
        out = {}
        for name, fn in calls.items():
            fn()  # the real call runs (it must work), the timing is injected
            timed.append((name, tower))
            out[name] = fake[(name, tower)]
        return out

    encoder, report = torch_auto_encoder(tiny, 224, sampler=sampler)
    runnable = {p for p, why in auto_precision.torch_precisions() if why is None}
    vision_names = {f"torch-{p}" for p in runnable - {"int8-text"}}
    assert {n for n, t in timed if t == "vision"} == vision_names  # int8-text is a text-tower precision
    want_vision = "torch-bf16-compiled" if "bf16-compiled" in runnable else "torch-fp32"
    want_text = "torch-int8-text" if "int8-text" in runnable else "torch-fp32"
    assert report["chosen"] == {"vision": want_vision, "text": want_text}
    for tower, entries in report["towers"].items():
        for name, entry in entries.items():
            if entry["passed"]:
                assert entry["samples_s"] == fake[(name, tower)] and entry["min_cosine"] >= entry["threshold"]
            else:
                assert entry["reason"]
    assert report["summary"].startswith("precision auto on ") and want_text in report["summary"]
    # what it serves matches the fp32 reference on inputs auto did not time
    ids = Tokenizer(52)(SAMPLE_TEXTS).ids
    pixels = generated_pixels(224, count=3, seed=21)
    ref = TorchEncoder(tiny, 224)
    assert row_cosines(encoder.encode_texts(ids), ref.encode_texts(ids)).min() >= 0.99
    assert row_cosines(encoder.encode_images(pixels), ref.encode_images(pixels)).min() >= 0.999


def test_per_tower_encoder_routes_each_tower():
    class Fixed:
        def __init__(self, value, dim=4, resolution=224):
            self.value, self.embed_dim, self.input_resolution = value, dim, resolution

        def encode_images(self, pixels):
            return np.full((len(pixels), self.embed_dim), self.value, np.float32)

        def encode_texts(self, ids):
            return np.full((len(ids), self.embed_dim), -self.value, np.float32)

    both = PerTowerEncoder(Fixed(1.0), Fixed(2.0), {"vision": "onnx-int8", "text": "torch-int8-text"})
    assert both.precision == "vision onnx-int8, text torch-int8-text"
    assert both.encode_images(torch.zeros(2, 3, 224, 224))[0, 0] == 1.0
    assert both.encode_texts(torch.zeros(3, 5, dtype=torch.long))[0, 0] == -2.0
    with pytest.raises(InputError, match="disagree"):
        PerTowerEncoder(Fixed(1.0), Fixed(2.0, dim=8))


# ---- the export: per-tower record and what is served ---------------------------------------------------------------

@pytest.fixture(scope="module")
def auto_export(tmp_path_factory):
    """The tiny model with random weights exported with --precision auto through the CLI."""
    out = tmp_path_factory.mktemp("auto-towers") / "export"
    assert export_main(["--model", "tiny", "--random-weights", "--out", str(out), "--precision", "auto"]) == 0
    return out


def test_auto_export_records_every_candidate_per_tower(auto_export, capsys):
    manifest = load_manifest(auto_export)
    assert manifest.checkpoint_hash.startswith("random-seed-")
    towers = manifest.selection["towers"]
    for tower in ("vision", "text"):
        names = set(towers[tower]["candidates"])
        assert {"onnx-fp32", "onnx-int8", "onnx-int8-static"} <= names
        assert {"torch-bf16", "torch-bf16-compiled"} <= names
        assert ("torch-int8-text" in names) == (tower == "text")
        for name, entry in towers[tower]["candidates"].items():
            assert entry["passed"] == ("reason" not in entry)
            if entry["passed"]:
                assert len(entry["samples_s"]) == 5 and entry["spread_s"] >= 0
                assert entry["min_cosine"] >= entry["threshold"]
        chosen = towers[tower]["chosen"]
        assert towers[tower]["candidates"][chosen]["passed"]
        assert towers[tower]["chosen_onnxruntime"].startswith("onnx-")
    assert manifest.selection["summary"].startswith("precision auto on ")


def test_auto_export_serves_each_towers_choice(auto_export, tiny_checkpoint):
    towers = served_towers(auto_export)
    encoder, manifest = open_encoder(auto_export)
    for tower in ("vision", "text"):
        chosen = towers[tower]["chosen"]
        label = chosen if chosen.startswith(("torch-", "openvino-")) else f"onnx-{towers[tower]['onnx']}"
        assert label in manifest.precision
    clip = load_model(None, "tiny", random_weights=True).model.eval()
    ref = TorchEncoder(clip, 224)
    ids = Tokenizer(52)(SAMPLE_TEXTS).ids
    pixels = generated_pixels(224, count=3, seed=23)
    assert row_cosines(encoder.encode_texts(ids), ref.encode_texts(ids)).min() >= 0.99
    assert row_cosines(encoder.encode_images(pixels), ref.encode_images(pixels)).min() >= 0.99


def test_a_torch_choice_is_served_from_the_checkpoint_or_falls_back_to_onnx(auto_export, tmp_path, monkeypatch):
    """A copy whose text tower chose torch fp32: served by torch when the weights are at hand (here: the seeded
    random weights the export recorded), by that tower's best ONNX precision when they are not."""
    import shutil

    from engine.backends import export_reader

    copy = shutil.copytree(auto_export, tmp_path / "copy")
    raw = json.loads((copy / "manifest.json").read_text())
    text = raw["selection"]["towers"]["text"]
    text["candidates"]["torch-fp32"] = {"backend": "torch", "precision": "fp32", "passed": True}
    text["chosen"] = "torch-fp32"
    (copy / "manifest.json").write_text(json.dumps(raw))
    onnx_text = text["chosen_onnxruntime"]
    assert served_towers(copy)["text"] == {"chosen": "torch-fp32", "onnx": onnx_text.split("-", 1)[1]}
    ids = Tokenizer(52)(SAMPLE_TEXTS).ids
    ref = TorchEncoder(load_model(None, "tiny", random_weights=True).model.eval(), 224).encode_texts(ids)
    encoder, manifest = open_encoder(copy)
    assert manifest.precision.endswith("text torch-fp32") or manifest.precision == "torch-fp32"
    assert row_cosines(encoder.encode_texts(ids), ref).min() >= THRESHOLDS["fp32"]
    monkeypatch.setattr(export_reader, "_torch_model", lambda directory, manifest: None)
    encoder, manifest = open_encoder(copy)
    assert "torch" not in manifest.precision and onnx_text in manifest.precision
    assert row_cosines(encoder.encode_texts(ids), ref).min() >= 0.99


# ---- OpenVINO candidates (optional backend) -------------------------------------------------------------------------

OPENVINO = openvino_backend.import_openvino()
needs_openvino = pytest.mark.skipif(OPENVINO is None, reason="openvino is not installed "
                                    '(pip install --no-build-isolation -e ".[openvino]")')


def _export_files(directory):
    """export precision -> (vision, text) ONNX paths of an auto export's passing precisions, and the dims."""
    top = load_manifest(directory)
    files = {}
    for precision, entry in top.selection["candidates"].items():
        if entry["passed"]:
            sub = directory / entry["directory"]
            manifest = load_manifest(sub)
            files[precision] = (sub / manifest.vision.file, sub / manifest.text.file)
    return files, top.encoder_dims()


def _fp32_parity(ids, pixels):
    ref = TorchEncoder(load_model(None, "tiny", random_weights=True).model.eval(), 224)
    want = {"vision": ref.encode_images(pixels), "text": ref.encode_texts(ids)}
    return lambda enc: {"vision": float(row_cosines(enc.encode_images(pixels), want["vision"]).min()),
                        "text": float(row_cosines(enc.encode_texts(ids), want["text"]).min())}


def test_auto_export_records_each_openvino_candidate_with_its_source_or_reason(auto_export):
    towers = load_manifest(auto_export).selection["towers"]
    for tower in ("vision", "text"):
        entries = towers[tower]["candidates"]
        for name, (source, _) in openvino_backend.CANDIDATES.items():
            entry = entries[name]
            assert entry["backend"] == "openvino" and entry["source"] == source
            if OPENVINO is None:
                assert not entry["passed"] and "pip install" in entry["reason"]
            elif entry["passed"]:
                assert entry["min_cosine"] >= entry["threshold"] == THRESHOLDS[openvino_backend.GATE_PRECISION[name]]
            else:
                assert entry["reason"]


@needs_openvino
def test_openvino_wins_a_tower_only_beyond_the_noise(auto_export):
    """Injected timings: OpenVINO fp32 replaces ONNX fp32 for images only when faster by more than the spread."""
    files, dims = _export_files(auto_export)
    ids = Tokenizer(52)(SAMPLE_TEXTS).ids
    pixels = generated_pixels(224, count=2, seed=29)
    fast = {"vision": [0.50, 0.52, 0.51], "text": [0.10, 0.10, 0.10]}  # vision beyond, text inside the noise
    seen = []

    def sampler(tower, calls):
        for fn in calls.values():
            fn()
        seen.extend(calls)
        return {name: fast[tower] if name == "openvino-fp32" else [9.0, 9.0, 9.0] for name in calls}

    gates = {name: THRESHOLDS[gate] for name, gate in openvino_backend.GATE_PRECISION.items()}
    pool = TimingPool(pixels, ids[:1], sampler=sampler)
    timed = auto_precision.openvino_candidates(files, dims, _fp32_parity(ids, pixels), gates, pool)
    pool.flush()
    assert "openvino-fp32" in seen
    onnx = {"vision": cand("onnx-fp32", [1.0, 1.01, 1.02], threshold=0.99999),
            "text": cand("onnx-fp32", [0.098, 0.102, 0.11], threshold=0.99999)}
    choices = choose_towers({t: [onnx[t], *timed[t]] for t in ("vision", "text")})
    assert choices["vision"].name == "openvino-fp32" and choices["text"].name == "onnx-fp32"
    assert choices["vision"].min_cosine >= THRESHOLDS["fp32"]


def test_without_openvino_its_candidates_carry_the_install_hint(auto_export, monkeypatch):
    monkeypatch.setattr(openvino_backend, "import_openvino", lambda: None)
    files, dims = _export_files(auto_export)
    pool = TimingPool(torch.zeros(1, 3, 224, 224), torch.ones(1, 4, dtype=torch.long),
                      sampler=lambda *a: pytest.fail("nothing may be timed"))
    timed = auto_precision.openvino_candidates(files, dims, lambda enc: {},
                                               {name: 0.99 for name in openvino_backend.CANDIDATES}, pool)
    pool.flush()
    for tower in ("vision", "text"):
        assert [c.name for c in timed[tower]] == list(openvino_backend.CANDIDATES)
        assert all(not c.passed and "pip install" in c.reason for c in timed[tower])


def test_an_openvino_choice_is_served_or_falls_back_to_onnx(auto_export, tmp_path, monkeypatch):
    """A copy whose vision tower chose OpenVINO fp32: served by OpenVINO over the fp32 ONNX file where openvino
    is installed, by the tower's best ONNX precision (with a warning) where it is not."""
    import shutil

    copy = shutil.copytree(auto_export, tmp_path / "copy")
    raw = json.loads((copy / "manifest.json").read_text())
    vision = raw["selection"]["towers"]["vision"]
    vision["candidates"]["openvino-fp32"].update(passed=True, min_cosine=1.0)
    vision["candidates"]["openvino-fp32"].pop("reason", None)
    vision["chosen"] = "openvino-fp32"
    (copy / "manifest.json").write_text(json.dumps(raw))
    onnx_vision = vision["chosen_onnxruntime"]
    pixels = generated_pixels(224, count=3, seed=37)
    ref = TorchEncoder(load_model(None, "tiny", random_weights=True).model.eval(), 224).encode_images(pixels)
    if OPENVINO is not None:
        encoder, manifest = open_encoder(copy)
        assert manifest.precision.startswith("vision openvino-fp32") or manifest.precision == "openvino-fp32"
        assert manifest.vision.file.startswith("fp32/")
        assert isinstance(encoder.vision, openvino_backend.OpenVinoEncoder)
        assert row_cosines(encoder.encode_images(pixels), ref).min() >= THRESHOLDS["fp32"]
    monkeypatch.setattr(openvino_backend, "import_openvino", lambda: None)
    assert served_towers(copy)["vision"]["chosen"] == onnx_vision
    encoder, manifest = open_encoder(copy)
    assert "openvino" not in manifest.precision and onnx_vision in manifest.precision
    assert row_cosines(encoder.encode_images(pixels), ref).min() >= 0.99


def test_the_openvino_encoder_refuses_a_tower_it_was_not_built_with(auto_export):
    if OPENVINO is None:
        with pytest.raises(InputError, match="pip install"):
            openvino_backend.OpenVinoEncoder(None, None, embed_dim=8, input_resolution=224)
        return
    files, dims = _export_files(auto_export)
    text_only = openvino_backend.OpenVinoEncoder(None, files["fp32"][1], **dims)
    assert text_only.encode_texts(Tokenizer(52)(SAMPLE_TEXTS).ids).shape == (len(SAMPLE_TEXTS), dims["embed_dim"])
    with pytest.raises(InputError, match="without the vision tower"):
        text_only.encode_images(torch.zeros(1, 3, 224, 224))
    with pytest.raises(InputError, match="'f32' or 'bf16'"):
        openvino_backend.OpenVinoEncoder(None, files["fp32"][1], hint="fp16", **dims)


def test_random_weights_with_a_checkpoint_is_refused(tiny_checkpoint, tmp_path):
    with pytest.raises(InputError, match="random_weights excludes a checkpoint"):
        export_model("tiny", tmp_path / "x", tiny_checkpoint, random_weights=True)
    assert THRESHOLDS["int8"] == 0.99
