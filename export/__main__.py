"""CLI: python -m export --model NAME [--checkpoint PATH] --out DIR --format onnx|tensorrt --precision ..."""
from __future__ import annotations

import argparse
import json
import sys

from engine.errors import EngineError
from engine.models import available_models

from .onnx_export import PRECISIONS
from .pipeline import FORMATS, export_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    parser.add_argument("--model", required=True, choices=available_models())
    parser.add_argument("--checkpoint", default=None, help="cn_clip checkpoint (default: the official weights)")
    parser.add_argument("--out", required=True, help="export directory to create or replace")
    parser.add_argument("--format", default="onnx", choices=FORMATS)
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS)
    parser.add_argument("--images", default=None, help="folder of your images for the parity check")
    parser.add_argument("--texts", default=None, help="UTF-8 file of your texts, one per line, for the parity check")
    parser.add_argument("--min-cosine", type=float, default=None,
                        help="parity threshold (default: fp32 0.99999, fp16 0.999, int8 0.99)")
    args = parser.parse_args(argv)
    try:
        manifest = export_model(args.model, args.out, args.checkpoint, args.format, args.precision,
                                args.images, args.texts, args.min_cosine)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"out": args.out, "precision": manifest.precision, "parity": manifest.parity}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
