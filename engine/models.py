"""Model registry and cn_clip checkpoint loading (fp32, weights_only) for the five official sizes plus `tiny`."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import re
import socket
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from .errors import CheckpointError, InputError

_CN_CLIP_CONFIG_DIR = "model_configs"
DEFAULT_CACHE_DIR = Path(os.path.expanduser("~/.cache/clip"))
TINY_SEED = 0


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build one cn_clip CLIP structure and find its official weights."""

    name: str
    vision_struct: str | None  # cn_clip model_configs name, or None for an inline config
    text_struct: str | None
    input_resolution: int
    hub_repo: str | None = None  # cn_clip's download names (HuggingFace OFA-Sys / ModelScope repo)
    filename: str | None = None  # file name cn_clip caches under ~/.cache/clip
    inline_config: Mapping[str, Any] = field(default_factory=dict)

    def config(self) -> dict[str, Any]:
        """The keyword arguments of `cn_clip.clip.model.CLIP` for this structure (a fresh dict)."""
        if self.inline_config:
            return copy.deepcopy(dict(self.inline_config))
        info = _read_cn_clip_config(self.vision_struct)
        info.update(_read_cn_clip_config(self.text_struct))
        if isinstance(info["vision_layers"], str):  # RN50 stores "[3,4,6,3]"
            info["vision_layers"] = json.loads(info["vision_layers"])
        return info


# The tiny structure: same code path and tokenizer vocabulary as the real models, seconds to run on CPU.
_TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "image_resolution": 224,
    "vision_layers": 2,
    "vision_width": 64,
    "vision_patch_size": 32,
    "vision_head_width": 32,
    "vocab_size": 21128,
    "text_attention_probs_dropout_prob": 0.1,
    "text_hidden_act": "gelu",
    "text_hidden_dropout_prob": 0.1,
    "text_hidden_size": 64,
    "text_initializer_range": 0.02,
    "text_intermediate_size": 128,
    "text_max_position_embeddings": 512,
    "text_num_attention_heads": 2,
    "text_num_hidden_layers": 2,
    "text_type_vocab_size": 2,
}

_REGISTRY: dict[str, ModelSpec] = {
    "RN50": ModelSpec("RN50", "RN50", "RBT3-chinese", 224, "chinese-clip-rn50", "clip_cn_rn50.pt"),
    "ViT-B-16": ModelSpec(
        "ViT-B-16", "ViT-B-16", "RoBERTa-wwm-ext-base-chinese", 224,
        "chinese-clip-vit-base-patch16", "clip_cn_vit-b-16.pt",
    ),
    "ViT-L-14": ModelSpec(
        "ViT-L-14", "ViT-L-14", "RoBERTa-wwm-ext-base-chinese", 224,
        "chinese-clip-vit-large-patch14", "clip_cn_vit-l-14.pt",
    ),
    "ViT-L-14-336": ModelSpec(
        "ViT-L-14-336", "ViT-L-14-336", "RoBERTa-wwm-ext-base-chinese", 336,
        "chinese-clip-vit-large-patch14-336px", "clip_cn_vit-l-14-336.pt",
    ),
    "ViT-H-14": ModelSpec(
        "ViT-H-14", "ViT-H-14", "RoBERTa-wwm-ext-large-chinese", 224,
        "chinese-clip-vit-huge-patch14", "clip_cn_vit-h-14.pt",
    ),
    "tiny": ModelSpec("tiny", None, None, 224, inline_config=_TINY_CONFIG),
}


def available_models() -> list[str]:
    """Names accepted by `get_spec` and `Retriever.from_checkpoint`."""
    return list(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The registered spec for `name`; an InputError lists the valid names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown model {name!r}; available models: {available_models()}") from None


def _read_cn_clip_config(struct: str | None) -> dict[str, Any]:
    import cn_clip.clip

    path = Path(cn_clip.clip.__file__).parent / _CN_CLIP_CONFIG_DIR / f"{struct}.json"
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def build_model(spec: ModelSpec) -> torch.nn.Module:
    """A cn_clip CLIP with `spec`'s structure in fp32 eval mode (cn_clip's loader would cast to fp16)."""
    from cn_clip.clip.model import CLIP

    model = CLIP(**spec.config())
    return model.float().eval()


def build_random_model(spec: ModelSpec, seed: int = TINY_SEED) -> torch.nn.Module:
    """A model with deterministic random weights: for tests and offline trials only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(spec)


def save_checkpoint(model: torch.nn.Module, path: str | Path, *, module_prefix: bool = True) -> Path:
    """Write `model` as cn_clip's training does: {"epoch", "step", "name", "state_dict"} with `module.` keys."""
    prefix = "module." if module_prefix else ""
    state = {f"{prefix}{k}": v.detach().cpu() for k, v in model.state_dict().items()}
    path = Path(path)
    torch.save({"epoch": 1, "step": 1, "name": "engine-test", "state_dict": state}, path)
    return path


def official_checkpoint_path(spec: ModelSpec, cache_dir: Path | None = None) -> Path:
    """Where cn_clip's `load_from_name` caches `spec`'s weights; downloads them if a hub client can."""
    cache_dir = DEFAULT_CACHE_DIR if cache_dir is None else cache_dir
    if spec.filename is None:
        raise CheckpointError(f"model {spec.name!r} has no official weights; pass a checkpoint path")
    target = cache_dir / spec.filename
    if target.is_file():
        return target
    advice = (f"Download {spec.filename} from the HuggingFace repo OFA-Sys/{spec.hub_repo} (or ModelScope "
              f"AI-ModelScope/{spec.hub_repo}) and place it at {target}, or pass --checkpoint PATH.")
    unreachable = hub_unreachable()
    if unreachable:  # say so at once, instead of the hub client's minute of retries
        raise CheckpointError(f"weights for {spec.name} not found at {target}, and {unreachable}. {advice}")
    try:
        from huggingface_hub import hf_hub_download

        cache_dir.mkdir(parents=True, exist_ok=True)
        return Path(hf_hub_download(f"OFA-Sys/{spec.hub_repo}", filename=spec.filename, local_dir=cache_dir))
    except Exception as exc:  # no client or no such file: tell the user what to place where
        raise CheckpointError(f"weights for {spec.name} not found at {target} and could not be downloaded "
                              f"({exc.__class__.__name__}). {advice}") from exc


def hub_unreachable(timeout_s: float = 3.0) -> str | None:
    """Why the HuggingFace hub ($HF_ENDPOINT, default huggingface.co) cannot be reached from here (offline mode,
    no name resolution, no connection within `timeout_s`), or None when a connection opens."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    endpoint = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        return f"{host}:{port} cannot be reached from this machine ({exc.__class__.__name__}: {exc})"
    return None


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _load_tensors_only(path: Path) -> Any:
    """torch.load with weights_only (nothing but tensors and plain containers is unpickled); a file it refuses or
    cannot read is a CheckpointError saying what the file is, never torch's advice to turn the safety off."""
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is an empty file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if refused is None:
            raise CheckpointError(f"checkpoint {path} is not a PyTorch checkpoint file ({exc.__class__.__name__}: "
                                  f"{str(exc).splitlines()[0]})") from None
        raise CheckpointError(
            f"checkpoint {path} holds Python objects ({refused.group(1)}), not only weights; the engine loads only "
            "tensors. Save the weights alone from where the file came from: torch.save({\"state_dict\": "
            "model.state_dict()}, PATH)") from None
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is not a PyTorch checkpoint file (torch.save's zip format could "
                              f"not be read: {exc.__class__.__name__}: {exc})") from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights in a cn_clip checkpoint, prefix-free, flash-attention keys mapped back, pooler dropped."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    checkpoint = _load_tensors_only(path)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(checkpoint).__name__}, expected a dict")
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} has no state_dict of tensors")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if "bert.pooler" not in k}
    return _unfuse_flash_attention(state)


def _unfuse_flash_attention(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map keys of checkpoints trained with --use-flash-attention back to the standard module names."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("attn.Wqkv.weight") or key.endswith("attn.Wqkv.bias"):
            out[key.replace("attn.Wqkv.", "attn.in_proj_")] = value
        elif ".attention.self.Wqkv." in key:
            base, kind = key.split(".attention.self.Wqkv.")
            for name, part in zip(("query", "key", "value"), torch.chunk(value, 3)):
                out[f"{base}.attention.self.{name}.{kind}"] = part
        elif ".attention.self.out_proj." in key:
            base, kind = key.split(".attention.self.out_proj.")
            out[f"{base}.attention.output.dense.{kind}"] = value
        else:
            out[key] = value
    return out


def load_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `model` strictly; a CheckpointError lists missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:5]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:5]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:5]})")
        raise CheckpointError(f"checkpoint {source} does not match the model structure: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


@dataclass(frozen=True)
class LoadedModel:
    """A ready fp32 model with its spec and the identity of the weights it holds."""

    spec: ModelSpec
    model: torch.nn.Module
    checkpoint_hash: str


def load_model(checkpoint: str | Path | None, model: str = "ViT-B-16", random_weights: bool = False) -> LoadedModel:
    """Build `model` and load `checkpoint` (cn_clip format); with no path, the official cached weights.

    `tiny` with no path, or any model with `random_weights` (benchmarks and trials only), gets deterministic
    random weights, so the whole engine runs offline.
    """
    spec = get_spec(model)
    if random_weights and checkpoint is not None:
        raise InputError(f"random_weights excludes a checkpoint (got {checkpoint})")
    if random_weights or (checkpoint is None and spec.filename is None):
        return LoadedModel(spec, build_random_model(spec), f"random-seed-{TINY_SEED}")
    path = Path(checkpoint) if checkpoint is not None else official_checkpoint_path(spec)
    state = read_state_dict(path)
    net = build_model(spec)
    load_weights(net, state, str(path))
    return LoadedModel(spec, net, file_sha256(path))
