"""Command line over the Retriever API: `index` a collection (in one process or on Ray), `search` a saved
index, `upgrade` an index written in the previous on-disk format, `verify` an index's every checksum."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from .backends.torch_backend import PRECISION_CHOICES
from .cli_common import add_laclip_arguments, laclip_from_args, report_error
from .errors import EngineError
from .install_hints import install_command
from .models import available_models


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _index_parser(sub.add_parser("index", help="encode images (and texts), or import embeddings, into an index"))
    search = sub.add_parser("search", help="query a saved index")
    search.add_argument("--index", required=True)
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="text -> image query")
    query.add_argument("--image", help="image -> text query (path)")
    search.add_argument("-k", type=int, default=10)
    search.add_argument("--checkpoint", help="override the checkpoint path the index records")
    search.add_argument("--device", default="cpu")
    search.add_argument("--json", action="store_true", help="print hits as JSON")
    upgrade = sub.add_parser("upgrade", help="convert an index in the previous format (CURRENT + snapshot) in place")
    upgrade.add_argument("directory")
    upgrade.add_argument("--drop-texts", action="store_true",
                         help="drop texts encoded with the old text pipeline (re-encode them afterwards)")
    verify = sub.add_parser("verify", help="read a whole index and check every checksum; exit 1 naming each "
                                           "damaged file")
    verify.add_argument("directory")
    duplicates = sub.add_parser("duplicates", help="groups of near-duplicate images (global vectors within the "
                                                   "threshold), as a table or JSON")
    duplicates.add_argument("directory")
    duplicates.add_argument("--threshold", type=float, default=0.95, help="cosine similarity (default 0.95)")
    duplicates.add_argument("--limit", type=int, help="print at most this many groups (largest first)")
    duplicates.add_argument("--json", action="store_true", help="print {threshold, groups, images} as JSON")
    return parser


def _index_parser(index: argparse.ArgumentParser) -> None:
    index.add_argument("--model", default="ViT-B-16", choices=available_models())
    index.add_argument("--checkpoint", help="cn_clip checkpoint (.pt); default: the official weights")
    index.add_argument("--random-weights", action="store_true", help="seeded random weights (trials, benchmarks)")
    index.add_argument("--out", required=True, help="index directory (created, or resumed when it exists)")
    what = index.add_argument_group("what to index (at least one)")
    what.add_argument("--images", nargs="+", metavar="SOURCE",
                      help="image folders (recursive; id = relative path without suffix), list files of paths, "
                           "cn_clip {split}_imgs.tsv files, WebDataset .tar shards")
    what.add_argument("--source-kind", choices=["auto", "folder", "list", "tsv", "tar", "iiif"], default="auto",
                      help="how to read every SOURCE (auto: by what it is; an http(s) URL or .json is IIIF)")
    what.add_argument("--iiif", nargs="+", metavar="URL_OR_FILE",
                      help="IIIF Presentation manifests or collections (v2 or v3; collections followed to their "
                           "manifests); each canvas's image is fetched through the Image API at the size the "
                           "model needs; ids are canvas ids")
    iiif = index.add_argument_group("IIIF fetching (with --iiif)")
    iiif.add_argument("--iiif-max-manifests", type=int, default=1000, metavar="N",
                      help="manifests followed from a collection, at most (default 1000)")
    iiif.add_argument("--iiif-concurrency", type=int, default=8, help="documents fetched at once (default 8)")
    iiif.add_argument("--iiif-timeout-s", type=float, default=20.0, help="timeout per request (default 20)")
    iiif.add_argument("--iiif-retries", type=int, default=2, help="retries of a failed request (default 2)")
    iiif.add_argument("--iiif-max-mb", type=float, default=20.0, help="bytes per image, at most (default 20 MB)")
    what.add_argument("--texts", help="JSON lines {\"text_id\": ..., \"text\": ...}")
    what.add_argument("--features", nargs="+", metavar="FILE",
                      help="embeddings computed elsewhere: cn_clip extract_features.py jsonl, or a .npy "
                           "(with --feature-ids and --feature-kind)")
    what.add_argument("--feature-ids", help="ids of a .npy features file, one per line in row order")
    what.add_argument("--feature-kind", choices=["image", "text"], help="what a .npy features file holds")
    run = index.add_argument_group("running")
    run.add_argument("--device", default="cpu", help="device of the single-process run")
    run.add_argument("--precision", default="fp32", choices=PRECISION_CHOICES,
                     help="PyTorch tower precision (bf16-compiled: fastest on CPUs with AMX or AVX512-BF16)")
    run.add_argument("--batch-size", type=int, default=32, help="images per encode batch")
    run.add_argument("--segment-rows", type=int, default=1024, help="images per written segment")
    run.add_argument("--publish-every", type=int, default=1000, metavar="N",
                     help="commit every N encoded images or every --publish-seconds, whichever comes first, so a "
                          "killed run keeps what it published and a rerun skips it (default 1000)")
    run.add_argument("--publish-seconds", type=float, default=60.0, metavar="SECONDS",
                     help="commit at least this often while images are waiting (default 60)")
    run.add_argument("--skip-bad", action="store_true",
                     help="skip bad images (each reported with its file, tar member or tsv line) instead of failing")
    run.add_argument("--progress-every", type=int, default=1000,
                     help="without a terminal, print a progress line every N images")
    run.add_argument("--quiet", action="store_true", help="no progress output")
    ray = index.add_argument_group(f"Ray ({install_command('distributed')})")
    ray.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                     help="run on Ray: no value or 'local' starts a local Ray; 'auto' joins this machine's "
                          "cluster; ray://HOST:10001 or HOST:6379 joins that cluster")
    ray.add_argument("--workers", type=int, default=1, help="encode workers (one model each)")
    ray.add_argument("--gpus-per-worker", type=float, help="default: 1 when the cluster has GPUs, else 0")
    ray.add_argument("--cpus-per-worker", type=float,
                     help="CPUs Ray reserves per encode worker; default: 1, or an equal share of the cluster's "
                          "CPUs less one task's when the workers would not leave room for the prepare tasks "
                          "(a value that leaves no room is refused)")
    ray.add_argument("--cpus-per-task", type=float,
                     help="CPUs Ray reserves per prepare/write task; default: 1 (half the CPUs on a 1-CPU cluster)")
    ray.add_argument("--stall-timeout-s", type=float, default=600.0, metavar="SECONDS",
                     help="stop with an error naming the stage (prepare, encode, write) when no batch finishes "
                          "for this long (default 600; 0: never)")
    add_laclip_arguments(index)


def run_index(args: argparse.Namespace) -> int:
    from .distributed import IndexJob, RayOptions, index_collection
    from .features_io import FeatureFile

    if not (args.images or args.iiif or args.texts or args.features):
        raise EngineError("nothing to index: give --images, --texts and/or --features (or --iiif)")
    if args.ray is not None and not (args.images or args.iiif):
        raise EngineError("--ray distributes image encoding: give --images or --iiif")
    ray = None if args.ray is None else RayOptions(
        args.ray, args.workers, gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
        cpus_per_task=args.cpus_per_task, stall_timeout_s=args.stall_timeout_s)
    features = [FeatureFile(path, args.feature_ids, args.feature_kind) for path in args.features or []]
    job = IndexJob(images=[*(args.images or []), *iiif_sources(args)], out=args.out, model=args.model,
                   checkpoint=args.checkpoint,
                   random_weights=args.random_weights, laclip=laclip_from_args(args), texts=args.texts,
                   features=features, source_kind=args.source_kind, device=args.device, precision=args.precision,
                   batch_size=args.batch_size, segment_rows=args.segment_rows, publish_every=args.publish_every,
                   commit_seconds=args.publish_seconds, skip_bad=args.skip_bad, ray=ray,
                   progress=not args.quiet, progress_every=args.progress_every)
    report = index_collection(job)
    for problem in report.problems:
        print(f"skipped: {problem}", file=sys.stderr)
    print(f"{report.summary()} -> {args.out}")
    return 0


def iiif_sources(args: argparse.Namespace) -> list:
    """The --iiif sources with their fetch settings, at the size the model (and its LACLIP crops) needs."""
    from .iiif.fetch import FetchPolicy
    from .iiif.harvest import IiifSource
    from .iiif.images import needed_side
    from .models import get_spec

    if not args.iiif:
        return []
    policy = FetchPolicy(args.iiif_timeout_s, args.iiif_retries, int(args.iiif_max_mb * (1 << 20)),
                         concurrency=args.iiif_concurrency)
    side = needed_side(get_spec(args.model).input_resolution, laclip_from_args(args))
    return [IiifSource(location, side, args.iiif_max_manifests, policy) for location in args.iiif]


def run_search(args: argparse.Namespace) -> int:
    from .retriever import Retriever

    retriever = Retriever.load(args.index, checkpoint=args.checkpoint, device=args.device)
    hits = (retriever.search_images(args.text, k=args.k) if args.text is not None
            else retriever.search_texts(args.image, k=args.k))
    if args.json:
        print(json.dumps([{"id": h.id, "score": h.score, "payload": h.payload} for h in hits], ensure_ascii=False))
        return 0
    print(f"{'rank':>4}  {'score':>7}  id  {'source' if args.text is not None else 'text'}")
    for rank, hit in enumerate(hits, 1):
        payload = hit.payload or {}
        shown = payload.get("text", payload.get("source", ""))
        print(f"{rank:>4}  {hit.score:+.4f}  {hit.id}  {shown}".rstrip())
    return 0


def run_upgrade(args: argparse.Namespace) -> int:
    from .index import upgrade

    print(upgrade(args.directory, drop_texts=args.drop_texts))
    return 0


def run_duplicates(args: argparse.Namespace) -> int:
    from .duplicates import find_duplicates, groups_json, groups_table
    from .index import Index

    snapshot = Index.open(args.directory, refresh_interval_s=None).snapshot()
    if args.limit is not None and args.limit < 1:
        raise EngineError(f"--limit must be at least 1, got {args.limit}")
    report = groups_json(find_duplicates(snapshot, args.threshold), snapshot, args.limit)
    print(json.dumps(report, ensure_ascii=False) if args.json else groups_table(report))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from .index.verification import verify_index

    report = verify_index(args.directory)
    print(report.summary(), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"index": run_index, "search": run_search, "upgrade": run_upgrade, "verify": run_verify,
                "duplicates": run_duplicates}
    try:
        return commands[args.command](args)
    except EngineError as exc:
        return report_error(exc)
