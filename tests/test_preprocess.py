"""Preprocessing equals cn_clip's own image_transform + _preprocess_text + tokenize + model; bad input fails clearly.

tests/test_fidelity.py runs the same comparison through cn_clip's evaluation datasets (LMDB images, jsonl texts).
"""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from cn_clip.clip import image_transform, tokenize
from cn_clip.clip.utils import create_model
from cn_clip.eval.data import _preprocess_text
from PIL import Image

from conftest import image_bytes, make_image
from engine import ImageDecodeError, InputError, Retriever
from engine.models import build_random_model, get_spec, save_checkpoint
from engine.preprocess import ImageTransform, Tokenizer, load_image, normalize_text

MODES = ["RGB", "RGBA", "LA", "P", "L", "I;16", "CMYK"]
SIZES = [(92, 96), (1887, 366), (366, 1887), (3, 700), (1000, 2), (224, 224)]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


@pytest.fixture(scope="module")
def retriever(tiny_checkpoint):
    return Retriever.from_checkpoint(tiny_checkpoint, model="tiny", progress=False)


@pytest.mark.parametrize("mode", MODES)
def test_image_embeddings_equal_cn_clip(retriever, mode):
    images = [make_image(w, h, mode, seed=i) for i, (w, h) in enumerate(SIZES)]
    assert all(image.mode == mode for image in images)
    reference_pixels = torch.stack([image_transform(224)(image) for image in images])
    with torch.no_grad():
        reference = retriever.encoder.model.encode_image(reference_pixels).numpy()
    ours = retriever.encode_images(images)
    assert _cosines(ours, reference).min() >= 0.99999
    assert np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)


def test_pixels_identical_to_cn_clip_for_paths_bytes_and_pil(tmp_path):
    image = make_image(301, 157, "RGBA", seed=3)
    image.save(tmp_path / "a.png")
    expected = image_transform(224)(Image.open(tmp_path / "a.png"))
    transform = ImageTransform(224)
    for source in (tmp_path / "a.png", str(tmp_path / "a.png"), image_bytes(image), Image.open(tmp_path / "a.png")):
        assert torch.equal(transform(load_image(source)), expected)


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation "rotate 90": cn_clip ignores it, so the engine must too
    buf = io.BytesIO()
    make_image(120, 60, seed=4).save(buf, format="JPEG", exif=exif)
    return buf.getvalue()


def _two_frame_gif() -> bytes:
    frames = [make_image(50, 70, seed=s).convert("P") for s in (5, 6)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


@pytest.mark.parametrize("data", [_exif_rotated_jpeg(), _two_frame_gif(),
                                  image_bytes(make_image(90, 33, "CMYK", seed=7), "JPEG")],
                         ids=["exif-orientation", "gif-first-frame", "cmyk-jpeg"])
def test_pixels_identical_to_cn_clip_eval_decoding(data):
    """cn_clip's eval: Image.open(BytesIO(urlsafe_b64decode(row))) then image_transform, nothing else."""
    expected = image_transform(224)(Image.open(io.BytesIO(base64.urlsafe_b64decode(base64.b64encode(data)))))
    assert torch.equal(ImageTransform(224)(load_image(data)), expected)


TEXTS = ["一只橘猫", "“敦煌壁画”中的飞天，衣带飘舞", "Hello 世界 123", "长" * 80, "床前明月光\n疑是地上霜"]


def cn_clip_tokens(texts: list[str], context_length: int = 52) -> torch.Tensor:
    """cn_clip's evaluation/training text pipeline: tokenize([_preprocess_text(text)])."""
    return tokenize([_preprocess_text(t) for t in texts], context_length=context_length)


def test_tokenizer_equals_cn_clip():
    for length in (52, 24):
        ours = Tokenizer(length)(TEXTS)
        assert torch.equal(ours.ids, cn_clip_tokens(TEXTS, length))
    assert Tokenizer(52)(TEXTS).truncated == [False, False, False, True, False]


def test_text_embeddings_equal_cn_clip(retriever):
    with torch.no_grad():
        reference = retriever.encoder.model.encode_text(cn_clip_tokens(TEXTS)).numpy()
    assert _cosines(retriever.encode_texts(TEXTS), reference).min() >= 0.99999


def test_every_retriever_text_path_normalises(retriever):
    curly, straight = ["“猫”在“窗台”上 CAT"], ['"猫"在"窗台"上 cat']
    assert normalize_text(curly[0]) == straight[0]
    assert torch.equal(retriever.tokenize(curly).ids, retriever.tokenize(straight).ids)
    assert np.array_equal(retriever.encode_texts(curly), retriever.encode_texts(straight))


@pytest.mark.parametrize("bad", ["", "   ", "\t\n", "\u200b\x00\u3000", "\x07"])
def test_empty_text_is_an_error(bad):
    with pytest.raises(InputError, match="empty"):
        Tokenizer()(["好", bad])


def test_non_string_text_is_an_error():
    with pytest.raises(InputError, match="int"):
        Tokenizer()(["好", 3])


def test_official_structure_loads_like_cn_clip(tmp_path):
    """RN50 random weights saved as an official (fp16, module.) checkpoint: cn_clip's loader and ours agree."""
    spec = get_spec("RN50")
    model = build_random_model(spec, seed=5).half()
    path = save_checkpoint(model, tmp_path / "clip_cn_rn50.pt")
    cn_model = create_model(f"{spec.vision_struct}@{spec.text_struct}", torch.load(path, weights_only=True)).float()
    cn_model.eval()
    ours = Retriever.from_checkpoint(path, model="RN50", progress=False, batch_size=4)
    images = [make_image(w, h, "RGBA", seed=i) for i, (w, h) in enumerate(SIZES[:3])]
    with torch.no_grad():
        ref_img = cn_model.encode_image(torch.stack([image_transform(224)(i) for i in images])).numpy()
        ref_txt = cn_model.encode_text(cn_clip_tokens(TEXTS[:3])).numpy()
    assert _cosines(ours.encode_images(images), ref_img).min() >= 0.99999
    assert _cosines(ours.encode_texts(TEXTS[:3]), ref_txt).min() >= 0.99999


def _truncated_png() -> bytes:
    data = image_bytes(make_image(200, 200, seed=1))
    return data[: len(data) // 2]


def _bomb_png() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buf, format="PNG")  # 81 Mpx, a few KB on disk
    return buf.getvalue()


@pytest.mark.parametrize("data, problem", [
    (b"", "empty"),
    (b"this is not an image", "not a readable image"),
    (_truncated_png(), "cannot decode"),
    (image_bytes(make_image(64, 64, seed=2))[:40], "not a readable image"),
    (_bomb_png(), "decompression bomb"),
])
def test_bad_image_bytes_raise_one_clear_error(data, problem):
    with pytest.raises(ImageDecodeError, match=problem) as caught:
        load_image(data)
    assert "object at 0x" not in str(caught.value)  # no Python object repr from Pillow's own message


def test_bad_image_files_name_the_path(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    for name in ("zero.png", "text.jpg", "missing.png"):
        with pytest.raises(ImageDecodeError, match=name):
            load_image(tmp_path / name)


def test_pixel_limit_is_configurable():
    with pytest.raises(ImageDecodeError, match="exceeds the limit of 100"):
        load_image(make_image(20, 20), max_pixels=100)


def test_wrong_type_is_an_image_error():
    with pytest.raises(ImageDecodeError, match="expected a path, bytes or a PIL image"):
        load_image(12345)
