"""CLI: python -m export --model NAME [--checkpoint PATH] --out DIR --format onnx|tensorrt --precision ...|auto"""
from __future__ import annotations

import argparse
import json
import sys

from engine.backends.export_manifest import MANIFEST_NAME, ExportManifest
from engine.errors import EngineError
from engine.models import available_models

from .onnx_export import PRECISIONS
from .pipeline import AUTO, FORMATS, export_model


def report(out: str, manifest: ExportManifest) -> str:
    """What a person needs after an export: where, which precision served and why, its parity; the rest is in
    the manifest (or --json)."""
    parity = manifest.parity
    cosines = ", ".join(f"{tower} {min(s['min'] for s in parity[tower].values()):.5f}" for tower in ("vision", "text"))
    chosen = "chosen by --precision auto: the fastest that passed parity" if manifest.selection else "as asked"
    lines = [f"exported {manifest.model} to {out}: precision {manifest.precision} ({chosen})",
             f"parity, min cosine vs fp32 PyTorch: {cosines} (threshold {parity['threshold']})"]
    if manifest.selection:
        lines += [f"candidate {name}: " + (f"{c['seconds'] * 1e3:.1f} ms, min cosine {c['min_cosine']:.5f}"
                                           if c["passed"] else f"failed parity ({c['reason']})")
                  for name, c in manifest.selection["candidates"].items()]
        lines.append(manifest.selection["summary"])
    lines.append(f"details: {out}/{MANIFEST_NAME}")
    return "\n".join(lines)


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
                        help="JSON lines {\"text\": ...} (as python -m engine index reads) of your texts, for the "
                             "parity check (and calibration)")
    parser.add_argument("--min-cosine", type=float, default=None,
                        help="parity threshold (default: fp32 0.99999, fp16/bf16 0.999, int8/int8-static 0.99)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of the short report")
    args = parser.parse_args(argv)
    try:
        manifest = export_model(args.model, args.out, args.checkpoint, args.format, args.precision,
                                args.images, args.texts, args.min_cosine, random_weights=args.random_weights)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not args.json:
        print(report(args.out, manifest))
        return 0
    summary = {"out": args.out, "precision": manifest.precision, "parity": manifest.parity}
    if manifest.selection:
        summary["candidates"] = manifest.selection["candidates"]
        summary["towers"] = {t: s["chosen"] for t, s in manifest.selection.get("towers", {}).items()}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
