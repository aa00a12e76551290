"""A full integrity check of an index directory (`python -m engine verify DIR`, `engine.serve --verify-on-start`):
every segment the commit names is read in full against its checksums and checked against the commit and the
manifest, every delete file against the checksum in its name; each damaged file is named, none is changed."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import IndexFormatError
from .commit import DELETES, SEGMENTS, read_commit
from .opening import check_segment, manifest_of, read_deletes
from .segment import SEGMENT_SUFFIX, Segment
from .storage import verify_container


@dataclass(frozen=True)
class Damage:
    """One damaged file (relative to the index directory) and what is wrong with it."""

    file: str
    problem: str


@dataclass
class VerifyReport:
    """What `verify_index` read: the number of segment and delete files checked, and every damaged one."""

    segments: int = 0
    delete_files: int = 0
    damaged: list[Damage] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damaged

    def summary(self) -> str:
        head = (f"{self.segments} segment files and {self.delete_files} delete files checked: "
                f"{len(self.damaged)} damaged")
        return "\n".join([head, *(f"  {d.file}: {d.problem}" for d in self.damaged)])


def verify_index(root: str | Path) -> VerifyReport:
    """Check every file the index's newest commit names; never raises for damage, reports it."""
    root = Path(root)
    report = VerifyReport()
    try:
        data = read_commit(root)
        manifest = manifest_of(root, data)
        entries = list(data["segments"])
    except (IndexFormatError, KeyError, TypeError) as exc:
        report.damaged.append(Damage("index.json", _short(exc, root, "index.json")))
        return report
    for entry in entries:
        name = f"{SEGMENTS}/{entry.get('name')}{SEGMENT_SUFFIX}"
        report.segments += 1
        try:
            verify_container(root / name)
            segment = Segment.open(root / name)
            check_segment(segment, manifest, entry, name)
        except (IndexFormatError, OSError) as exc:
            report.damaged.append(Damage(name, _short(exc, root, name)))
            continue
        for kind, file in dict(entry.get("deletes", {})).items():
            report.delete_files += 1
            try:
                read_deletes(root / DELETES / file, segment.rows(kind))
            except (IndexFormatError, OSError) as exc:
                report.damaged.append(Damage(f"{DELETES}/{file}", _short(exc, root, f"{DELETES}/{file}")))
    return report


def _short(exc: BaseException, root: Path, file: str) -> str:
    """The error's message with the index directory's path and the file's own name left out (the report names
    the file, relative to the index)."""
    message = str(exc).replace(f"{root}/", "").replace(str(root), ".")
    return message[len(file) + 2:] if message.startswith(f"{file}: ") else message
