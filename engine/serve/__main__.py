"""`python -m engine.serve --model NAME [...]`: start the dynamic-batching retrieval server (see --help).

Adds are durable by default: without --index the index lives in a default directory (logged at start-up);
--in-memory keeps it in memory only (answers then say "persisted": false)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from ..backends.export_reader import BACKENDS
from ..backends.torch_backend import PRECISION_CHOICES
from ..batcher import BatcherConfig
from ..cli_common import add_laclip_arguments, laclip_from_args
from ..decoding import DecodeBudget
from ..errors import EngineError, InputError
from ..iiif.links import check_viewer
from ..install_hints import install_command
from ..index import COMMIT, read_commit
from ..index.opening import manifest_of
from ..models import available_models
from .app import HttpLimits, create_app
from .cluster import ClusterOptions
from .core import ServeConfig, ServerCore
from .guards import AccessPolicy, guarded_h11
from .metrics import ServerMetrics

INDEX_SUBDIR = ".cnclip-index"


def default_index_dir(model: str | None) -> Path:
    """Where adds go when no --index is given: $CNCLIP_INDEX_DIR, else a per-model folder in the user's data
    directory ($XDG_DATA_HOME or ~/.local/share)."""
    if os.environ.get("CNCLIP_INDEX_DIR"):
        return Path(os.environ["CNCLIP_INDEX_DIR"])
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "cnclip-engine" / f"index-{model or 'export'}"


def recorded_model(p: argparse.ArgumentParser, index_dir: Path | None) -> str | None:
    """The model an existing index at `index_dir` was built with (its manifest; with it, its checkpoint path,
    context length and LACLIP settings are taken from the index too), or None when no index is there yet."""
    if index_dir is None or not (index_dir / COMMIT).is_file():
        return None
    try:
        return manifest_of(index_dir, read_commit(index_dir)).model
    except EngineError as exc:
        p.error(f"--index {index_dir}: {exc}")


def build_parser() -> argparse.ArgumentParser:
    d, limits, serve = BatcherConfig(), HttpLimits(), ServeConfig()
    p = argparse.ArgumentParser(prog="python -m engine.serve", description=__doc__)
    p.add_argument("--model", choices=available_models(),
                   help="model structure (default: the one an existing --index records; required otherwise, "
                        "unless --export, whose manifest names it); 'tiny' with no checkpoint runs offline on "
                        "random weights")
    p.add_argument("--checkpoint", help="cn_clip checkpoint (.pt); default: the official weights for --model")
    p.add_argument("--random-weights", action="store_true",
                   help="seeded random weights for any model (benchmarks and trials only; no real retrieval)")
    p.add_argument("--export", type=Path, help="serve the towers of a `python -m export` directory")
    p.add_argument("--backend", default=serve.backend, choices=BACKENDS,
                   help="runtime for --export (tensorrt needs --device cuda)")
    p.add_argument("--index", type=Path, help="index directory: opened if it holds an index; adds and deletes "
                                              "are durable there before they are answered (default: "
                                              "GALLERY/.cnclip-index with --gallery, else $CNCLIP_INDEX_DIR or "
                                              "~/.local/share/cnclip-engine/index-MODEL)")
    p.add_argument("--read-only", action="store_true",
                   help="serve the existing index at --index as a replica: it follows the writer's commits "
                        "(within about 1 s) and answers adds and deletes 403; run one writer and any number of these")
    p.add_argument("--decode-timeout-s", type=float, default=DecodeBudget.timeout_s,
                   help="wall-time budget of one image decode, in a worker process that is killed past it (400 "
                        "naming the upload); 0: decode in the server process without a budget")
    p.add_argument("--decode-workers", type=int, default=DecodeBudget.workers,
                   help="image decoding processes (default %(default)s)")
    p.add_argument("--max-request-pixels", type=int, default=ServeConfig.max_request_pixels,
                   help="decoded pixels one add may carry in all, read from the images' headers before decoding "
                        "(413 past it; default %(default)s)")
    p.add_argument("--verify-on-start", action="store_true",
                   help="read the whole index against its checksums before serving (as python -m engine verify); "
                        "a damaged file stops the server naming it")
    p.add_argument("--in-memory", action="store_true",
                   help="keep the index in memory only (nothing written; answers say \"persisted\": false)")
    p.add_argument("--gallery", type=Path, help="image folder to index at start-up (recursive; ids = paths relative "
                   "to the folder without suffix, file stems directly inside; only images not yet indexed); saved "
                   f"to --index (default GALLERY/{INDEX_SUBDIR})")
    p.add_argument("--texts", type=Path, help="with --gallery: JSON lines {\"text_id\"|\"id\": ..., \"text\": ...}")
    p.add_argument("--skip-bad", action="store_true", help="with --gallery: leave out (and log) images that do not "
                   "decode; without it the server refuses to start, naming every one")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default=serve.device)
    p.add_argument("--precision", default=serve.precision, choices=PRECISION_CHOICES,
                   help="PyTorch towers (not --export): bf16 autocast, or bf16-compiled (bf16 weights, vision tower "
                        "compiled per batch bucket on first use; fastest on CPUs with AMX or AVX512-BF16); fp16 "
                        "needs --device cuda")
    p.add_argument("--api-key", default=os.environ.get("CNCLIP_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes but /v1/info (default: $CNCLIP_API_KEY)")
    p.add_argument("--protect-metrics", action="store_true", help="with --api-key: /metrics needs the key too")
    p.add_argument("--protect-docs", action="store_true",
                   help="with --api-key: /docs, /redoc and /openapi.json need the key too")
    p.add_argument("--iiif-viewer", metavar="PATTERN",
                   help="viewer URL for IIIF hits with {manifest} and {canvas}, e.g. "
                        "\"https://viewer.example/?manifest={manifest}&canvas={canvas}\" (Mirador or the museum's "
                        "own); hits carry it in payload.iiif.viewer")
    r = p.add_argument_group(f"serving on Ray Serve ({install_command('distributed')})")
    r.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="score on Ray Serve shards of --index: no value or 'local' starts a local Ray, 'auto' joins "
                        "this machine's cluster, else a cluster address; this process stays the ingress and writer")
    r.add_argument("--shards", type=int, default=1, help="with --ray: shards, each mapping a disjoint part of the "
                                                        "index's segments (default 1)")
    r.add_argument("--replicas", type=int, default=1, help="with --ray: replicas of every shard (default 1)")
    r.add_argument("--cpus-per-replica", type=float,
                   help="with --ray: CPUs each replica reserves (default: an equal share of the cluster's, at most 1)")
    g = p.add_argument_group("batching and limits")
    g.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help="items per tower call")
    g.add_argument("--max-delay-ms", type=float, default=d.max_delay_ms,
                   help="how long the oldest queued item waits for a batch to fill")
    g.add_argument("--max-queue", type=int, default=d.max_queue,
                   help="queued items per tower before requests get 429")
    g.add_argument("--request-timeout-s", type=float, default=d.timeout_s,
                   help="a request waiting longer than this in a tower queue gets 503")
    g.add_argument("--workers", type=int, default=serve.workers,
                   help="threads decoding images, tokenizing and scoring")
    g.add_argument("--max-body-mb", type=float, default=limits.max_body_bytes / (1 << 20),
                   help="larger request bodies get 413")
    g.add_argument("--max-pixels", type=int, default=serve.max_pixels,
                   help="larger images get 400 (decompression bomb guard; Pillow's own limit follows it)")
    g.add_argument("--max-concurrency", type=int, default=limits.max_concurrency,
                   help="requests in flight before more get 503 (health and metrics excepted)")
    g.add_argument("--body-timeout-s", type=float, default=limits.body_timeout_s,
                   help="a request body not fully received within this gets 408 and its connection closed")
    g.add_argument("--header-timeout-s", type=float, default=limits.header_timeout_s,
                   help="a connection that sends no complete request headers within this is closed")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_laclip_arguments(p)
    return p


def config_from_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> ServeConfig:
    """Validate paths and numbers up front, so a typo fails before the server starts."""
    if args.texts is not None and args.gallery is None:
        p.error("--texts needs --gallery")
    if args.gallery is not None and not args.gallery.is_dir():
        p.error(f"--gallery {args.gallery}: not a directory")
    if args.texts is not None and not args.texts.is_file():
        p.error(f"--texts {args.texts}: no such file")
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        p.error(f"--checkpoint {args.checkpoint}: no such file")
    if sum([args.checkpoint is not None, args.random_weights, args.export is not None]) > 1:
        p.error("--checkpoint, --random-weights and --export are exclusive")
    if args.export is not None and not args.export.is_dir():
        p.error(f"--export {args.export}: not a directory")
    if args.export is not None and args.precision != "fp32":
        p.error("--precision is for PyTorch towers; an --export directory holds its own precisions")
    recorded = recorded_model(p, args.index)
    if args.model is not None and recorded is not None and args.model != recorded:
        p.error(f"--model {args.model}: the index at {args.index} was built with {recorded!r}; leave out --model "
                "(it is taken from the index) or give another --index for a new index")
    args.model = args.model or (recorded if args.export is None else None)
    if args.export is None and args.model is None:
        p.error("--model is required (unless --index names an existing index, or --export: each records the model)")
    if args.skip_bad and args.gallery is None:
        p.error("--skip-bad is for --gallery")
    if args.in_memory and args.index is not None:
        p.error("--in-memory and --index are exclusive")
    if args.read_only and (args.index is None or not (args.index / "index.json").is_file()):
        p.error("--read-only needs --index DIR holding an index (a replica serves what its writer commits)")
    if args.read_only and args.gallery is not None:
        p.error("--read-only cannot index a --gallery: index it with the writer")
    if args.index is not None and args.index.exists() and not args.index.is_dir():
        p.error(f"--index {args.index}: not a directory")
    for flag, value in (("--workers", args.workers), ("--max-body-mb", args.max_body_mb),
                        ("--max-pixels", args.max_pixels), ("--max-concurrency", args.max_concurrency),
                        ("--body-timeout-s", args.body_timeout_s), ("--header-timeout-s", args.header_timeout_s)):
        if not value > 0:
            p.error(f"{flag} must be > 0, got {value}")
    if (args.protect_metrics or args.protect_docs) and not args.api_key:
        p.error("--protect-metrics and --protect-docs need --api-key")
    if args.ray is None and (args.shards != 1 or args.replicas != 1 or args.cpus_per_replica is not None):
        p.error("--shards, --replicas and --cpus-per-replica need --ray")
    if args.ray is not None and args.in_memory:
        p.error("--ray serves an index directory: the shards open it (drop --in-memory)")
    index_dir = args.index
    if index_dir is None and not args.in_memory:
        index_dir = args.gallery / INDEX_SUBDIR if args.gallery is not None else default_index_dir(args.model)
    try:
        batch = BatcherConfig(args.max_batch_size, args.max_delay_ms, args.max_queue, args.request_timeout_s)
        laclip = laclip_from_args(args)
        decode = DecodeBudget(args.decode_timeout_s, args.decode_workers) if args.decode_timeout_s else None
        if args.max_request_pixels < 1:
            raise InputError(f"--max-request-pixels must be >= 1, got {args.max_request_pixels}")
        cluster = None if args.ray is None else ClusterOptions(
            args.ray, args.shards, args.replicas, args.cpus_per_replica, device=args.device)
        check_viewer(args.iiif_viewer)
    except EngineError as exc:
        p.error(str(exc))
    return ServeConfig(model=args.model, checkpoint=args.checkpoint, random_weights=args.random_weights,
                       export_dir=args.export, backend=args.backend, index_dir=index_dir, gallery=args.gallery,
                       texts=args.texts, laclip=laclip, device=args.device, precision=args.precision, batch=batch,
                       workers=args.workers, max_pixels=args.max_pixels, read_only=args.read_only, cluster=cluster,
                       skip_bad=args.skip_bad,
                       verify_on_start=args.verify_on_start, iiif_viewer=args.iiif_viewer, decode=decode,
                       max_request_pixels=args.max_request_pixels)


def check_export_runtime(args: argparse.Namespace) -> str | None:
    """Why --export cannot run here (its runtime is not installed), naming the extra to install."""
    if args.export is None:
        return None
    module, extra = ("tensorrt", "tensorrt") if args.backend == "tensorrt" else ("onnxruntime", "onnx")
    try:
        __import__(module)
    except ImportError:
        return f"--export with --backend {args.backend} needs {module}: {install_command(extra)}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    parser = build_parser()
    args = parser.parse_args(argv)
    config = config_from_args(parser, args)
    try:
        policy = AccessPolicy(args.api_key, args.protect_metrics, args.protect_docs)
    except EngineError as exc:
        parser.error(str(exc))
    missing = check_export_runtime(args)
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    url = f"http://{args.host}:{args.port}"
    where = config.index_dir if config.index_dir is not None else "in memory only (--in-memory)"
    print(f"cnclip-engine: search page {url}/  API docs {url}/docs  index: {where}", file=sys.stderr, flush=True)
    metrics = ServerMetrics()
    core = ServerCore(config, on_batch=metrics.observe_batch)
    failures: list[BaseException] = []
    server: uvicorn.Server | None = None

    def fatal(exc: BaseException) -> None:
        failures.append(exc)
        if server is not None:
            server.should_exit = True

    limits = HttpLimits(int(args.max_body_mb * (1 << 20)), args.body_timeout_s, args.max_concurrency,
                        args.header_timeout_s)
    app = create_app(core, metrics, policy=policy, limits=limits, on_fatal=fatal)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           http=guarded_h11(limits.header_timeout_s),
                                           timeout_graceful_shutdown=config.batch.timeout_s + 5))
    server.run()
    if failures:
        print(f"error: {failures[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
