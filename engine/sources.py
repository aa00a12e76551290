"""Image collections to index: a folder (recursive), a list file of paths, cn_clip's `{split}_imgs.tsv`,
WebDataset `.tar` shards, and IIIF manifests and collections (engine.iiif: an http(s) URL or a local `.json`).

Listing is cheap and runs once, on the driver: every image becomes an `ImageRef` (its id, where its bytes
are, its payload). The bytes are read later, in the prepare stage (a Ray task or the single process), so
an unreadable file is reported there. Every bad record becomes a `Problem` naming the file, tar member or
TSV line; nothing is dropped without being reported.

Ids: a folder's images follow engine.gallery's folder-id rule (`cats/001.jpg` has id `"cats/001"`, a file
directly inside the folder its stem; `--gallery` gives the same); a list file's line
`path` has the file stem (or the id after a tab: `path<TAB>id`); a TSV row its first column; a tar
sample its WebDataset key (`dir/name` before the first dot of the member name); a IIIF canvas its canvas id.
"""
from __future__ import annotations

import dataclasses
import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from .errors import ImageDecodeError, InputError
from .gallery import IMAGE_SUFFIXES, folder_images
from .iiif.fetch import FetchPolicy, fetch_image, fetch_many
from .iiif.harvest import IiifSource, list_iiif, looks_like_iiif
from .payloads import image_payloads
from .records import DatasetError, ImageRecord, Problem
from .records import read_tsv as read_tsv_rows

SourceKind = Literal["auto", "folder", "list", "tsv", "tar", "iiif"]
TAR_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")  # preference order in a sample
_WDS_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]+)$")  # WebDataset: key = path up to the basename's first dot

__all__ = ["Collection", "DatasetError", "IiifSource", "ImageRef", "Problem", "list_collection", "list_source"]


@dataclass(frozen=True)
class ImageRef:
    """Where one image's bytes are: a whole file, a tar member (offset + size), a TSV row (offset), or a IIIF image
    (`file`: the JSON of its URL and fetch policy, so a Ray task fetches it as the driver would; `where`: its canvas)."""

    id: str
    where: str
    file: str
    kind: Literal["file", "tar", "tsv", "iiif"] = "file"
    offset: int = -1
    size: int = -1
    line: int | None = None
    payload: dict = field(default_factory=dict)

    def open(self) -> Path | bytes:
        """A path for a file (decoding names it), else the member's or row's bytes; ImageDecodeError if unreadable."""
        if self.kind == "file":
            return Path(self.file)
        if self.kind == "iiif":
            request = json.loads(self.file)
            return fetch_image(request["url"], FetchPolicy(**request["fetch"]))
        if self.kind == "tsv":
            try:
                return ImageRecord(self.id, Path(self.file), self.line, self.offset).source()
            except OSError as exc:
                raise ImageDecodeError(f"cannot read ({exc.__class__.__name__}: {exc})") from exc
        try:
            with open(self.file, "rb") as f:
                f.seek(self.offset)
                data = f.read(self.size)
        except OSError as exc:
            raise ImageDecodeError(f"cannot read ({exc.__class__.__name__}: {exc})") from exc
        if len(data) != self.size:
            raise ImageDecodeError(f"truncated tar member: {len(data)} of {self.size} bytes")
        return data

    def problem(self, exc: Exception) -> Problem:
        """The bad-image record for this image, naming its file, tar member or TSV line."""
        message = str(exc)
        if self.kind == "file" and message.startswith(self.file):  # load_image already named the path
            message = message[len(self.file):].lstrip(": ")
        file = self.where if self.kind in ("tar", "iiif") else self.file
        return Problem(file, self.line, "undecodable", f"image {self.id!r}: {message}")


def open_all(refs: Sequence[ImageRef]) -> list[Path | bytes | InputError]:
    """Every ref's `open()` in order, an unreadable one's error in its place. IIIF images, network-bound, are
    fetched concurrently (their fetch policy's `concurrency` at a time); the rest are opened in turn."""
    concurrency = max((int(json.loads(ref.file)["fetch"].get("concurrency", 1)) for ref in refs
                       if ref.kind == "iiif"), default=1)
    return fetch_many(refs, ImageRef.open, concurrency)


@dataclass
class Collection:
    """The images of one or more sources, in listing order, and the problems found while listing."""

    images: list[ImageRef]
    problems: list[Problem]


def list_collection(sources: Sequence[str | Path], kind: SourceKind = "auto") -> Collection:
    """List every source; an id seen twice (in one source or across sources) is a `duplicate` problem."""
    if not sources:
        raise InputError("no image source given")
    images: list[ImageRef] = []
    problems: list[Problem] = []
    first: dict[str, ImageRef] = {}
    for source in sources:
        listed = list_source(source, kind)
        problems.extend(listed.problems)
        for ref in listed.images:
            if ref.id in first:
                problems.append(Problem(ref.where if ref.kind in ("tar", "iiif") else ref.file, ref.line, "duplicate",
                                        f"duplicate image id {ref.id!r} (first at {first[ref.id].where})"))
                continue
            first[ref.id] = ref
            images.append(ref)
    return Collection(images, problems)


def list_source(source: str | Path | IiifSource, kind: SourceKind = "auto") -> Collection:
    """The images of one source; `kind="auto"` picks by what it is: a folder, `.tsv`, `.tar`, an http(s) URL or
    `.json` (IIIF), else a list file. An IiifSource carries its own IIIF settings (engine.iiif.harvest)."""
    if isinstance(source, IiifSource):
        return _list_iiif(source)
    if kind == "iiif" or (kind == "auto" and looks_like_iiif(str(source))):
        return _list_iiif(IiifSource(str(source)))
    path = Path(source)
    if not path.exists():
        raise InputError(f"image source not found: {path}")
    kind = kind if kind != "auto" else _detect(path)
    if kind == "folder":
        return _list_folder(path)
    if not path.is_file():
        raise InputError(f"{path} is not a file (a {kind} source is a file)")
    if kind == "tsv":
        problems: list[Problem] = []
        rows = read_tsv_rows(path, problems)
        return Collection([ImageRef(r.id, f"{path}:{r.line}", str(path), "tsv", r.offset, line=r.line,
                                    payload={"source": f"{path.name}:{r.line}"}) for r in rows], problems)
    if kind == "tar":
        return _list_tar(path)
    if kind == "list":
        return _list_file(path)
    raise InputError(f"source kind must be auto, folder, list, tsv, tar or iiif, got {kind!r}")


def _detect(path: Path) -> str:
    if path.is_dir():
        return "folder"
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        return "tsv"
    if suffix == ".tar":
        return "tar"
    if suffix.lstrip(".") in TAR_IMAGE_SUFFIXES or suffix in IMAGE_SUFFIXES:
        raise InputError(f"{path} is an image, not a collection: give its folder, a list file, a .tsv or a .tar")
    if path.name.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        raise InputError(f"{path}: compressed tar shards are not supported (WebDataset shards are plain .tar)")
    return "list"


def _list_folder(folder: Path) -> Collection:
    """Image files under `folder` by engine.gallery's folder-id rule (recursive, hidden skipped, natural order)."""
    found = folder_images(folder)
    if not found and any(folder.glob("*.tar")):
        raise InputError(f"{folder} holds .tar shards but no images: pass the shards (e.g. {folder}/*.tar)")
    images = [ImageRef(image_id, str(path), str(path), payload={"source": path.relative_to(folder).as_posix()})
              for image_id, path in found]
    return Collection(images, [])


def _list_file(path: Path) -> Collection:
    """Lines `image path` or `image path<TAB>id` (blank lines and `#` comments skipped); relative paths are
    taken from the list file's folder."""
    images: list[ImageRef] = []
    problems: list[Problem] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the list file {path} ({exc.__class__.__name__}: {exc})") from exc
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        name, _, given = text.partition("\t")
        name = name.strip()
        image = Path(name) if Path(name).is_absolute() else path.parent / name
        image_id = given.strip() or Path(name).stem
        if not image_id:
            problems.append(Problem(str(path), number, "malformed", f"no id for {name!r}"))
            continue
        images.append(ImageRef(image_id, f"{image}", str(image), line=number, payload={"source": name}))
    return Collection(images, problems)


def _list_iiif(source: IiifSource) -> Collection:
    """The canvases of a IIIF manifest or collection, each fetched later (in the prepare stage) by its "iiif" ref."""
    listing = list_iiif(source)
    fetch = dataclasses.asdict(source.fetch)
    images = [ImageRef(c.id, c.id, json.dumps({"url": c.url, "fetch": fetch}), "iiif", payload=c.payload)
              for c in listing.canvases]
    return Collection(images, listing.problems)


def _list_tar(path: Path) -> Collection:
    """WebDataset samples: members grouped by key; one image (jpg/png/...) each, `.txt` -> payload "caption",
    `.json` (an object) merged into the payload, over "source" (engine.payloads' rule)."""
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                match = _WDS_KEY.match(member.name)
                key, suffix = (match.group(1), match.group(2).lower()) if match else (member.name, "")
                samples.setdefault(key, {})[suffix] = member
            return _tar_samples(path, tar, samples)
    except (tarfile.TarError, OSError) as exc:
        raise InputError(f"cannot read tar shard {path} ({exc.__class__.__name__}: {exc})") from exc


def _tar_samples(path: Path, tar: tarfile.TarFile, samples: dict[str, dict[str, tarfile.TarInfo]]) -> Collection:
    images: list[ImageRef] = []
    problems: list[Problem] = []
    for key, members in samples.items():
        image = next((members[s] for s in TAR_IMAGE_SUFFIXES if s in members), None)
        if image is None:
            names = ", ".join(m.name for m in members.values())
            problems.append(Problem(f"{path}:{key}", None, "missing_image", f"sample {key!r} has no image ({names})"))
            continue
        payload: dict = {}
        try:
            if "json" in members:
                meta = json.loads(_member_text(tar, members["json"]))
                if not isinstance(meta, dict):
                    raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
                payload.update(meta)
            if "txt" in members:
                payload["caption"] = _member_text(tar, members["txt"])
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            problems.append(Problem(f"{path}:{key}", None, "malformed", f"sample {key!r}: {exc}"))
            continue
        payload = image_payloads([f"{path.name}:{image.name}"], [payload])[0]  # the one payload rule
        images.append(ImageRef(key, f"{path}:{image.name}", str(path), "tar", image.offset_data, image.size,
                               payload=payload))
    return Collection(images, problems)


def _member_text(tar: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    handle = tar.extractfile(member)
    if handle is None:
        raise ValueError(f"{member.name} is not a regular file")
    return handle.read().decode("utf-8").strip()

