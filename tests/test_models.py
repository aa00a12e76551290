"""Registry and cn_clip checkpoint loading: prefixes, flash-attention keys, fp16 files, and every bad file."""
from __future__ import annotations

import pickle

import pytest
import torch
from cn_clip.clip.utils import _MODEL_INFO, _MODELS

from engine import CheckpointError, InputError, available_models
from engine.models import (build_random_model, get_spec, load_model, official_checkpoint_path, read_state_dict,
                           save_checkpoint)


def test_registry_matches_cn_clip():
    assert available_models() == ["RN50", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "tiny"]
    for name, info in _MODEL_INFO.items():
        spec = get_spec(name)
        assert f"{spec.vision_struct}@{spec.text_struct}" == info["struct"]
        assert spec.input_resolution == info["input_resolution"] == spec.config()["image_resolution"]
        assert (spec.hub_repo, spec.filename) == _MODELS[name]


def test_unknown_model_names_choices():
    with pytest.raises(InputError, match="ViT-B-16"):
        get_spec("ViT-Z-99")


def test_config_is_a_fresh_copy():
    spec = get_spec("tiny")
    spec.config()["embed_dim"] = 999
    assert spec.config()["embed_dim"] == 32


def _outputs(model: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 224, 224)
    ids = torch.tensor([[101, 872, 1962, 102, 0], [101, 2769, 102, 0, 0]])
    with torch.no_grad():
        return torch.cat([model.encode_image(pixels), model.encode_text(ids)])


@pytest.mark.parametrize("prefix", [True, False])
def test_loads_cn_clip_checkpoint_with_and_without_module_prefix(tmp_path, prefix):
    source = build_random_model(get_spec("tiny"), seed=7)
    path = save_checkpoint(source, tmp_path / "m.pt", module_prefix=prefix)
    loaded = load_model(path, "tiny")
    assert torch.equal(_outputs(loaded.model), _outputs(source))
    assert len(loaded.checkpoint_hash) == 64
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())


def test_loads_flash_attention_fp16_training_checkpoint(tmp_path):
    """cn_clip --use-flash-attention checkpoints fuse qkv (Wqkv) and store fp16 weights; both must load."""
    source = build_random_model(get_spec("tiny"), seed=8)
    state = {}
    for key, value in source.state_dict().items():
        value = value.half() if value.is_floating_point() else value
        if "attn.in_proj_" in key:
            key = key.replace("attn.in_proj_", "attn.Wqkv.")
        state[f"module.{key}"] = value
    for layer in range(2):
        base = f"module.bert.encoder.layer.{layer}.attention"
        for kind in ("weight", "bias"):
            parts = [state.pop(f"{base}.self.{n}.{kind}") for n in ("query", "key", "value")]
            state[f"{base}.self.Wqkv.{kind}"] = torch.cat(parts)
            state[f"{base}.self.out_proj.{kind}"] = state.pop(f"{base}.output.dense.{kind}")
    state["module.bert.pooler.dense.weight"] = torch.zeros(2, 2)  # old checkpoints carry the unused pooler
    torch.save({"epoch": 3, "step": 10, "name": "ft", "state_dict": state}, tmp_path / "ft.pt")
    loaded = load_model(tmp_path / "ft.pt", "tiny")
    reference = build_random_model(get_spec("tiny"), seed=8).half().float()
    assert torch.allclose(_outputs(loaded.model), _outputs(reference), atol=1e-6)


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt"):
        load_model(tmp_path / "nope.pt", "tiny")


def test_corrupt_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"not a torch file at all" * 10)
    with pytest.raises(CheckpointError, match="corrupt.pt"):
        load_model(path, "tiny")


def test_truncated_checkpoint_is_refused(tiny_checkpoint, tmp_path):
    data = tiny_checkpoint.read_bytes()
    path = tmp_path / "half.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="half.pt"):
        load_model(path, "tiny")


class _Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_checkpoint_cannot_run_code(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Payload()}, f)
    with pytest.raises(CheckpointError, match="evil.pt"):
        read_state_dict(path)


def test_mismatched_checkpoint_lists_keys_and_shapes(tmp_path, tiny_checkpoint):
    state = torch.load(tiny_checkpoint, weights_only=True)["state_dict"]
    state.pop("module.visual.proj")
    state["module.extra.weight"] = torch.zeros(1)
    state["module.text_projection"] = torch.zeros(64, 16)
    torch.save({"state_dict": state}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path / "bad.pt", "tiny")
    message = str(info.value)
    assert "bad.pt" in message and "visual.proj" in message and "extra.weight" in message
    assert "text_projection: checkpoint (64, 16) vs model (64, 32)" in message


def test_wrong_structure_is_refused(tiny_checkpoint):
    with pytest.raises(CheckpointError, match="does not match the model structure"):
        load_model(tiny_checkpoint, "RN50")


def test_official_name_without_file_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as info:
        official_checkpoint_path(get_spec("ViT-B-16"), cache_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "clip_cn_vit-b-16.pt") in message and "OFA-Sys/chinese-clip-vit-base-patch16" in message


def test_official_name_uses_cached_file(tmp_path):
    target = tmp_path / "clip_cn_rn50.pt"
    target.write_bytes(b"x")
    assert official_checkpoint_path(get_spec("RN50"), cache_dir=tmp_path) == target


def test_tiny_without_checkpoint_is_deterministic():
    a, b = load_model(None, "tiny"), load_model(None, "tiny")
    assert torch.equal(_outputs(a.model), _outputs(b.model))
    assert a.checkpoint_hash == "random-seed-0"


def test_random_weights_for_an_official_structure(tiny_checkpoint):
    loaded = load_model(None, "RN50", random_weights=True)
    assert loaded.checkpoint_hash == "random-seed-0" and loaded.spec.name == "RN50"
    with pytest.raises(InputError, match="random_weights excludes a checkpoint"):
        load_model(tiny_checkpoint, "tiny", random_weights=True)
