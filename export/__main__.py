"""CLI: python -m export --model NAME [--checkpoint PATH] --out DIR --format onnx|tensorrt --precision ...|auto"""
from __future__ import annotations

import argparse
import json
import sys

from engine.backends.onnx_backend import import_onnxruntime
from engine.errors import EngineError
from engine.models import available_models

from .onnx_export import PRECISIONS
from .pipeline import AUTO, FORMATS, export_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    parser.add_argument("--model", required=True, choices=available_models())
    parser.add_argument("--checkpoint", default=None, help="cn_clip checkpoint (default: the official weights)")
    parser.add_argument("--random-weights", action="store_true",
                        help="seeded random weights in the model's structure instead of a checkpoint (timing trials)")
    parser.add_argument("--out", required=True, help="export directory to create or replace")
    parser.add_argument("--format", default="onnx", choices=FORMATS)
    parser.add_argument("--precision", default="fp32", choices=(*PRECISIONS, AUTO),
                        help="auto: build the candidates, gate each on parity, time each here, serve the fastest")
    parser.add_argument("--images", default=None,
                        help="folder of your images for the parity check (and int8-static calibration)")
    parser.add_argument("--texts", default=None,
                        help="UTF-8 file of your texts, one per line, for the parity check (and calibration)")
    parser.add_argument("--min-cosine", type=float, default=None,
                        help="parity threshold (default: fp32 0.99999, fp16/bf16 0.999, int8/int8-static 0.99)")
    args = parser.parse_args(argv)
    try:
        import_onnxruntime()
        manifest = export_model(args.model, args.out, args.checkpoint, args.format, args.precision,
                                args.images, args.texts, args.min_cosine, random_weights=args.random_weights)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    summary = {"out": args.out, "precision": manifest.precision, "parity": manifest.parity}
    if manifest.selection:
        summary["candidates"] = manifest.selection["candidates"]
        summary["towers"] = {t: s["chosen"] for t, s in manifest.selection.get("towers", {}).items()}
    print(json.dumps(summary, indent=2))
    if manifest.selection.get("summary"):
        print(manifest.selection["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
