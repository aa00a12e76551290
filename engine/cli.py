"""Command line over the Retriever API: `index` a gallery folder, `search` a saved index."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from .errors import EngineError
from .gallery import list_images, read_texts_jsonl
from .laclip import LaclipConfig
from .models import available_models
from .retriever import Hit, Retriever


def add_laclip_arguments(parser: argparse.ArgumentParser) -> None:
    """LACLIP flags shared by every command that builds features (defaults from LaclipConfig)."""
    d = LaclipConfig()
    group = parser.add_argument_group("LACLIP")
    group.add_argument("--crops", type=int, default=d.num_crops, help="crops per image K; 0 = plain global CLIP")
    group.add_argument("--crop-mode", choices=["random", "grid"], default=d.crop_mode)
    group.add_argument("--crop-area", type=float, nargs=2, default=d.crop_area, metavar=("MIN", "MAX"))
    group.add_argument("--crop-aspect", type=float, nargs=2, default=d.crop_aspect, metavar=("MIN", "MAX"))
    group.add_argument("--tau", type=float, default=d.tau, help="softmax temperature of the crop weights")
    group.add_argument("--alpha", type=float, default=d.alpha, help="weight of the global term")
    group.add_argument("--weights", choices=["image", "text"], default=d.weights)
    group.add_argument("--seed", type=int, default=d.seed, help="crop placement seed")


def laclip_from_args(args: argparse.Namespace) -> LaclipConfig | None:
    if args.crops == 0:
        return None
    return LaclipConfig(num_crops=args.crops, crop_mode=args.crop_mode, crop_area=tuple(args.crop_area),
                        crop_aspect=tuple(args.crop_aspect), tau=args.tau, alpha=args.alpha,
                        weights=args.weights, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    index = sub.add_parser("index", help="encode a folder of images (and texts) into an index directory")
    index.add_argument("--model", default="ViT-B-16", choices=available_models())
    index.add_argument("--checkpoint", help="cn_clip checkpoint (.pt); default: the official weights")
    index.add_argument("--images", required=True, help="folder of images; ids are the file stems")
    index.add_argument("--texts", help="JSON lines {\"text_id\": ..., \"text\": ...}")
    index.add_argument("--out", required=True, help="index directory to write")
    index.add_argument("--device", default="cpu")
    index.add_argument("--batch-size", type=int, default=32)
    add_laclip_arguments(index)
    search = sub.add_parser("search", help="query a saved index")
    search.add_argument("--index", required=True)
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="text -> image query")
    query.add_argument("--image", help="image -> text query (path)")
    search.add_argument("-k", type=int, default=10)
    search.add_argument("--checkpoint", help="override the checkpoint path the index records")
    search.add_argument("--device", default="cpu")
    search.add_argument("--json", action="store_true", help="print hits as JSON")
    return parser


def run_index(args: argparse.Namespace) -> int:
    retriever = Retriever.from_checkpoint(args.checkpoint, model=args.model, device=args.device,
                                          laclip=laclip_from_args(args), batch_size=args.batch_size)
    images = list_images(args.images)
    retriever.add_images(images)
    if args.texts:
        ids, texts = read_texts_jsonl(args.texts)
        retriever.add_texts(texts, ids)
    retriever.save(args.out)
    print(f"indexed {len(retriever.index.image_ids)} images and {len(retriever.index.text_ids)} texts -> {args.out}")
    return 0


def run_search(args: argparse.Namespace) -> int:
    retriever = Retriever.load(args.index, checkpoint=args.checkpoint, device=args.device)
    hits: list[Hit] = (retriever.search_images(args.text, k=args.k) if args.text is not None
                       else retriever.search_texts(args.image, k=args.k))
    if args.json:
        print(json.dumps([{"id": h.id, "score": h.score} for h in hits], ensure_ascii=False))
    else:
        for rank, hit in enumerate(hits, 1):
            print(f"{rank:>3}  {hit.score:+.4f}  {hit.id}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_index(args) if args.command == "index" else run_search(args)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
