"""The run directory: checks before anything is written, crash-safe cn_clip-format checkpoints, resume state.

RUN_DIR/
  config.json                  the FinetuneConfig the run was started with
  log.jsonl                    one line per step, one per validation
  curves.png                   loss and validation MR over steps
  checkpoints/epoch_latest.pt  {"epoch", "step", "name", "state_dict", "optimizer", "finetune": {...}}
  checkpoints/best.pt          the same, at the best validation MR so far
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from ..errors import CheckpointError, InputError
from .config import FinetuneConfig

CONFIG_NAME = "config.json"
LOG_NAME = "log.jsonl"
PLOT_NAME = "curves.png"
LATEST_NAME = "epoch_latest.pt"
BEST_NAME = "best.pt"


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def prepare_new_run(run_dir: Path) -> None:
    """Refuse a folder that already holds a run (nothing is overwritten) or cannot be written; create it."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"--out {run_dir} exists and is not a folder")
    held = [name for name in (CONFIG_NAME, LOG_NAME, "checkpoints") if (run_dir / name).exists()]
    if held:
        raise InputError(f"--out {run_dir} already holds a run ({', '.join(held)}); continue it with "
                         f"--resume {run_dir}, or choose another --out")
    try:
        checkpoints_dir(run_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=checkpoints_dir(run_dir)):
            pass
    except OSError as exc:
        raise InputError(f"cannot write to --out {run_dir} ({exc.__class__.__name__}: {exc})") from exc


def check_writable(run_dir: Path) -> None:
    """A resumed run's folder must still be writable before any training step is spent."""
    try:
        with tempfile.TemporaryFile(dir=checkpoints_dir(run_dir)):
            pass
    except OSError as exc:
        raise InputError(f"cannot write to {run_dir} ({exc.__class__.__name__}: {exc})") from exc


def write_config(run_dir: Path, config: FinetuneConfig) -> None:
    atomic_write_bytes(Path(run_dir) / CONFIG_NAME,
                       json.dumps(config.to_dict(), ensure_ascii=False, indent=2).encode("utf-8"))


def read_config(run_dir: Path) -> FinetuneConfig:
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        raise InputError(f"--resume {run_dir}: no {CONFIG_NAME} there (not a fine-tuning run folder)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"--resume {run_dir}: {path} is unreadable ({exc})") from exc
    return FinetuneConfig.from_dict(data)


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """`write` into a temporary file beside `path`, fsync, then rename over it: readers see old or new, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` crash-safely (see atomic_write)."""
    atomic_write(path, lambda f: f.write(data))


def save_training_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """torch.save `payload` crash-safely (see atomic_write)."""
    atomic_write(path, lambda f: torch.save(payload, f))


def copy_as_best(run_dir: Path) -> None:
    """best.pt := epoch_latest.pt (copied to a temporary file, then renamed)."""
    folder = checkpoints_dir(run_dir)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{BEST_NAME}.")
    os.close(fd)
    try:
        shutil.copyfile(folder / LATEST_NAME, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _publish(tmp, folder / BEST_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_training_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The full state of RUN_DIR/checkpoints/epoch_latest.pt (weights_only: a checkpoint cannot run code)."""
    path = checkpoints_dir(run_dir) / LATEST_NAME
    if not path.is_file():
        raise CheckpointError(f"--resume {run_dir}: no checkpoint at {path} (the run saved none yet)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} could not be read ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(state, dict) or "finetune" not in state or "optimizer" not in state:
        raise CheckpointError(f"{path} is not a fine-tuning checkpoint of engine.finetune (no training state)")
    return state


def truncate_log(run_dir: Path, step: int) -> list[dict[str, Any]]:
    """Keep the log lines up to `step` (later ones belong to steps the resumed run will redo); return them."""
    path = Path(run_dir) / LOG_NAME
    if not path.is_file():
        return []
    kept = [row for row in read_log(path) if row["step"] <= step]
    atomic_write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept).encode("utf-8"))
    return kept


def read_log(path: Path) -> list[dict[str, Any]]:
    """The log's rows; a line cut short by a crash mid-write is left out."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def _publish(tmp: str, path: Path) -> None:
    """Give a finished temporary file the umask's usual permissions (mkstemp makes it owner-only), fsync'd
    beforehand by the caller, and rename it over `path`."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
