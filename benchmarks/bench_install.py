"""Issue 29's figures: the README's main command, as printed, from a fresh clone to `GET /readyz` = 200, and then
adding an extra (`pip install --no-build-isolation -e ".[finetune]"`) in that clone.

The main command is read from between README.md's <!-- main-command --> markers and run piece by piece (its ` && `
parts) in one bash shell, so each step is timed; only the port is changed, and CNCLIP_INDEX_DIR points into the
scratch folder. The load average is recorded around every step: on a shared 2-core machine it moves the figures.
`--busy N` runs N spinning processes beside it for the whole measurement (the issue's machine had another job
compiling beside it).

    python -m benchmarks.bench_install [--repo .] [--extra finetune] [--busy 2] [--out docs/perf/install.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.report_collect import machine_info

MARKER = "<!-- main-command -->"
READY_TIMEOUT_S = 1800.0


@dataclass
class Step:
    """One timed piece of the command: what ran, its seconds, and the 1-minute load average before and after."""

    command: str
    seconds: float
    load_before: float
    load_after: float


def main_command(readme: Path) -> str:
    """The one `python ...` line between the README's main-command markers."""
    text = readme.read_text(encoding="utf-8")
    parts = text.split(MARKER)
    if len(parts) < 3:
        raise SystemExit(f"{readme}: no block between two {MARKER} markers")
    lines = [line for line in parts[1].splitlines() if line.startswith("python")]
    if len(lines) != 1:
        raise SystemExit(f"{readme}: expected one command line between the {MARKER} markers, found {len(lines)}")
    return lines[0]


def with_port(command: str, port: int) -> str:
    """The command with its `--port N` replaced by `port` (appended when absent)."""
    words = command.split(" ")
    if "--port" in words:
        words[words.index("--port") + 1] = str(port)
        return " ".join(words)
    return f"{command} --port {port}"


def load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def timed_steps(clone: Path, command: str, port: int, log) -> tuple[list[Step], float]:
    """Run the command's parts in one shell, the last (the server) in the background until /readyz answers 200.
    Returns the steps and the total seconds to ready."""
    parts = command.split(" && ")
    marks = clone / ".bench-marks"
    script = ["set -e"]
    for index, part in enumerate(parts):
        script.append(f"echo {index} $(date +%s.%N) $(cut -d' ' -f1 /proc/loadavg) >> {shlex.quote(str(marks))}")
        script.append(part)
    env = {**os.environ, "CNCLIP_INDEX_DIR": str(clone / "index"), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("VIRTUAL_ENV", None)
    with open(clone / "bench-install.log", "wb") as out:
        started = time.time()
        proc = subprocess.Popen(["bash", "-c", "\n".join(script)], cwd=clone, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while not ready(port):
                if proc.poll() is not None:
                    raise SystemExit(f"the main command exited {proc.returncode} before /readyz; see "
                                     f"{clone / 'bench-install.log'}")
                if time.time() - started > READY_TIMEOUT_S:
                    raise SystemExit(f"no /readyz = 200 within {READY_TIMEOUT_S:.0f} s")
                time.sleep(0.5)
            total = time.time() - started
            ready_load = load1()
        finally:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=60)
    rows = [line.split() for line in marks.read_text().splitlines()]
    ends = [float(r[1]) for r in rows[1:]] + [started + total]
    loads = [float(r[2]) for r in rows[1:]] + [ready_load]
    steps = [Step(parts[int(r[0])], end - float(r[1]), float(r[2]), after)
             for r, end, after in zip(rows, ends, loads)]
    for step in steps:
        log(f"{step.seconds:7.1f} s  load {step.load_before:.1f} -> {step.load_after:.1f}  {step.command}")
    return steps, total


def add_extra(clone: Path, extra: str) -> Step:
    """Time `pip install --no-build-isolation -e ".[extra]"` in the clone's venv, after the main command."""
    command = f'. .venv/bin/activate && pip install --no-build-isolation -e ".[{extra}]"'
    ninja_log = clone / "build" / "native" / "objects-cpu" / ".ninja_log"
    compiled_before = ninja_log.stat().st_mtime_ns if ninja_log.exists() else None
    before, started = load1(), time.time()
    done = subprocess.run(["bash", "-c", command], cwd=clone, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{command} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    seconds = time.time() - started
    compiled = (ninja_log.stat().st_mtime_ns if ninja_log.exists() else None) != compiled_before
    return Step(command + ("  (compiled)" if compiled else "  (nothing compiled)"), seconds, before, load1())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_install", description=__doc__.split("\n")[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1],
                        help="the repository to clone (its committed HEAD is what is timed)")
    parser.add_argument("--extra", default="finetune", help="the extra installed afterwards")
    parser.add_argument("--keep", action="store_true", help="keep the scratch clone")
    parser.add_argument("--busy", type=int, default=0, help="spinning processes run beside the measurement")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        return measure(args)
    finally:
        for spinner in spinners:
            spinner.kill()


def measure(args: argparse.Namespace) -> int:
    """Clone, run the main command to /readyz, add the extra; print and (with --out) write the figures."""
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    scratch = Path(tempfile.mkdtemp(prefix="bench-install-"))
    clone = scratch / "repo"
    commit = subprocess.run(["git", "-C", str(args.repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    subprocess.run(["git", "clone", "-q", str(args.repo), str(clone)], check=True)
    command = with_port(main_command(clone / "README.md"), free_port())
    port = int(command.split("--port ")[1].split()[0])
    log(f"fresh clone of {args.repo} at {commit} in {clone}; running: {command}")
    steps, total = timed_steps(clone, command, port, log)
    log(f"main command to /readyz = 200: {total:.0f} s ({total / 60:.1f} min)")
    extra = add_extra(clone, args.extra)
    log(f"{extra.seconds:7.1f} s  load {extra.load_before:.1f} -> {extra.load_after:.1f}  {extra.command}")
    result = {"commit": commit, "machine": machine_info(), "busy": args.busy, "command": command,
              "to_ready_s": round(total, 1),
              "steps": [asdict(s) for s in steps], "extra": asdict(extra),
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps({"to_ready_s": result["to_ready_s"], "extra_s": round(extra.seconds, 1)}))
    if not args.keep:
        subprocess.run(["rm", "-rf", str(scratch)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
