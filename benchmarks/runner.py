"""Run the benchmark suite, one subprocess per subject, then write the report (benchmarks.report).

Each subject is a bench file: a pytest-benchmark file runs as `pytest FILE --benchmark-only --benchmark-json
--junitxml` (the JUnit XML carries skip reasons); a script-style file (no test functions) runs as
`python -m benchmarks.NAME --out JSON` (its JSON: pytest-benchmark's "benchmarks", or "points", or plain "rows";
see benchmarks.report_tables). A subject that fails, times out or is missing is reported, never hidden;
each finished case is also appended to raw/<name>.partial.jsonl (benchmarks.partial), so a timeout keeps them.

The whole suite runs within a wall-clock budget (quick: 480 s, what a loaded 2-core machine gets in 8 minutes).
Before each subject the time left is shared among the subjects still to run in proportion to their nominal
limits (`plan_limit`); when a share is below the nominal limit the subject runs smaller instead of being dropped:
its scale (share / nominal, at least MIN_SCALE) goes to it as BENCH_SCALE (bench files shrink sizes with
benchmarks.params.scaled) and multiplies the numbers after its `scaled_flags` in its arguments.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.params import QUICK_ENV, SCALE_ENV
from benchmarks.partial import PARTIAL_ENV

REPO = Path(__file__).resolve().parent.parent
RAW = "raw"
RUNS_FILE = "runs.json"
QUICK_BUDGET_S = 480.0  # 8 minutes on a loaded 2-core machine (issue 30)
FULL_BUDGET_S = 3000.0
MIN_SCALE = 0.25  # a subject is never shrunk below a quarter of its quick size
MIN_LIMIT_S = 20.0  # nor given less time than this while any is left


@dataclass(frozen=True)
class Subject:
    """One bench file and how to run it in full and quick mode."""

    name: str
    file: str  # path relative to the repository root (or absolute)
    quick_select: str | None = None  # pytest -k expression used in quick mode (on top of BENCH_QUICK=1)
    script_args: tuple[str, ...] = ()  # extra arguments for a script-style file
    script_quick_args: tuple[str, ...] = ()
    timeout_s: float = 600.0
    quick_timeout_s: float = 90.0
    scaled_flags: tuple[str, ...] = ()  # script arguments whose numbers shrink with the subject's scale


SUBJECTS: dict[str, Subject] = {s.name: s for s in [
    Subject("machine", "benchmarks/bench_machine.py", timeout_s=180, quick_timeout_s=45),
    Subject("towers", "benchmarks/bench_towers.py", timeout_s=900, quick_timeout_s=90),
    Subject("kernel", "benchmarks/bench_laclip_kernel.py", quick_select="fp32 and top10 and Q1",
            timeout_s=900, quick_timeout_s=100),
    Subject("serve", "benchmarks/bench_serve.py", script_args=("--concurrency", "1", "4", "16", "64"),
            script_quick_args=("--model", "tiny", "--concurrency", "1", "4", "16", "--requests", "32",
                               "--gallery-size", "8"),
            timeout_s=900, quick_timeout_s=80),
    Subject("index", "benchmarks/bench_index.py", script_quick_args=("--quick",)),
    Subject("finetune", "benchmarks/bench_finetune.py", script_quick_args=("--quick",)),
    # a local Ray, then tiny and ViT-B-16 each in one process and on 1 and 2 workers: fixed costs that do not
    # shrink with sizes (97 s on the quiet 2-core Xeon, 2026-12-06)
    Subject("distributed", "benchmarks/bench_distributed.py", script_quick_args=("--quick",), quick_timeout_s=120),
    Subject("soak", "benchmarks/bench_soak.py", script_quick_args=("--minutes", "0.5", "--rows", "2000"),
            quick_timeout_s=60, scaled_flags=("--minutes", "--rows")),
]}


@dataclass
class RunConfig:
    """Where to write, which subjects, quick or full, and the wall-clock budget of the whole suite."""

    out: Path
    quick: bool = False
    only: list[str] = field(default_factory=lambda: list(SUBJECTS))
    subjects: dict[str, Subject] = field(default_factory=lambda: dict(SUBJECTS))
    budget_s: float | None = None  # None: QUICK_BUDGET_S quick, FULL_BUDGET_S full
    python: str = sys.executable

    def __post_init__(self) -> None:
        unknown = [name for name in self.only if name not in self.subjects]
        if unknown:
            raise ValueError(f"unknown subject(s) {unknown}; choose from {sorted(self.subjects)}")
        if self.budget_s is None:
            self.budget_s = QUICK_BUDGET_S if self.quick else FULL_BUDGET_S


@dataclass
class SubjectRun:
    """What happened when one subject ran: status is ok | failed | timeout | missing."""

    name: str
    file: str
    kind: str  # pytest | script | none
    status: str
    seconds: float = 0.0
    returncode: int | None = None
    command: list[str] = field(default_factory=list)
    selection: str | None = None
    json_path: str | None = None
    junit_path: str | None = None
    partial_path: str | None = None  # JSON lines written case by case (benchmarks.partial)
    log_path: str | None = None
    reason: str = ""
    limit_s: float = 0.0  # the time it was given
    scale: float = 1.0  # the size it ran at, relative to its nominal (quick or full) size


def nominal_limit(subject: Subject, quick: bool) -> float:
    return subject.quick_timeout_s if quick else subject.timeout_s


def plan_limit(subject: Subject, remaining: list[Subject], left_s: float, quick: bool) -> tuple[float, float]:
    """(limit seconds, scale) for `subject`, the first of `remaining`, with `left_s` of the budget left: its
    share of the time left in proportion to the nominal limits of the subjects still to run (never more than its
    own nominal limit, never less than MIN_LIMIT_S while that much is left), and the size that share allows."""
    nominal = nominal_limit(subject, quick)
    total = sum(nominal_limit(s, quick) for s in remaining)
    share = min(nominal, left_s * nominal / total) if total > 0 else left_s
    limit = max(share, min(MIN_LIMIT_S, left_s))
    scale = 1.0 if share >= nominal else max(MIN_SCALE, share / nominal)
    return limit, scale


def scale_args(args: tuple[str, ...], flags: tuple[str, ...], scale: float) -> list[str]:
    """`args` with the number after each of `flags` multiplied by `scale` (integers stay integers, >= 1)."""
    out = list(args)
    for i, arg in enumerate(out[:-1]):
        if arg in flags and scale != 1.0:
            value = float(out[i + 1]) * scale
            out[i + 1] = str(max(1, int(round(value)))) if out[i + 1].isdigit() else f"{value:.3g}"
    return out


def is_pytest_file(path: Path) -> bool:
    """A bench file is pytest-style when it defines test functions; otherwise it is a script with main()."""
    text = path.read_text(encoding="utf-8")
    return "\ndef test_" in text or "\n    def test_" in text


def subject_command(subject: Subject, path: Path, cfg: RunConfig, raw: Path,
                    scale: float = 1.0) -> tuple[str, list[str], str | None]:
    """(kind, argv, selection) for one subject; results go to raw/<name>.json (+ .xml for pytest)."""
    out_json = raw / f"{subject.name}.json"
    if is_pytest_file(path):
        cmd = [cfg.python, "-m", "pytest", str(path), "--benchmark-only", f"--benchmark-json={out_json}",
               f"--junitxml={raw / f'{subject.name}.xml'}", "-q", "-rs", "-p", "no:cacheprovider",
               "-p", "benchmarks.partial", f"--rootdir={REPO}"]
        selection = subject.quick_select if cfg.quick else None
        if selection:
            cmd += ["-k", selection]
        return "pytest", cmd, selection
    try:
        module = ".".join(path.resolve().relative_to(REPO).with_suffix("").parts)
        cmd = [cfg.python, "-m", module]
    except ValueError:  # a file outside the repository runs by path
        cmd = [cfg.python, str(path)]
    args = scale_args(subject.script_quick_args if cfg.quick else subject.script_args, subject.scaled_flags, scale)
    return "script", [*cmd, *args, "--out", str(out_json)], " ".join(args) or None


def _stop_group(proc: subprocess.Popen) -> None:
    """Interrupt the subject's process group, then kill what remains (finished cases are in its partial file)."""
    for sig, wait_s in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_subject(subject: Subject, cfg: RunConfig, timeout_s: float, scale: float = 1.0) -> SubjectRun:
    """Run one subject in its own process group with a time limit; never raises for a failing subject."""
    path = Path(subject.file) if Path(subject.file).is_absolute() else REPO / subject.file
    if not path.is_file():
        return SubjectRun(subject.name, subject.file, "none", "missing", reason=f"{subject.file} not present")
    raw = cfg.out / RAW
    raw.mkdir(parents=True, exist_ok=True)
    kind, cmd, selection = subject_command(subject, path, cfg, raw, scale)
    partial = raw / f"{subject.name}.partial.jsonl"
    for stale in (raw / f"{subject.name}.json", raw / f"{subject.name}.xml", partial):
        stale.unlink(missing_ok=True)
    env = dict(os.environ)
    env[PARTIAL_ENV] = str(partial)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if cfg.quick:
        env[QUICK_ENV] = "1"
    else:
        env.pop(QUICK_ENV, None)
    env[SCALE_ENV] = f"{scale:.4f}"
    log = raw / f"{subject.name}.log"
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout_s)
            status = "ok" if rc in (0, 5) else "failed"  # 5: pytest collected nothing (all deselected)
            reason = "" if status == "ok" else f"exit status {rc}; see {log.name}"
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            rc, status = proc.returncode, "timeout"
            kept = (raw / f"{subject.name}.json").is_file() or partial.is_file()
            reason = f"stopped after its {timeout_s:.0f} s limit; " + (
                "the figures it wrote are kept" if kept else "it was stopped before writing any figures")
    run = SubjectRun(subject.name, subject.file, kind, status, round(time.monotonic() - started, 1), rc, cmd,
                     selection, log_path=str(log), reason=reason, limit_s=round(timeout_s, 1), scale=scale)
    if (raw / f"{subject.name}.json").is_file():
        run.json_path = str(raw / f"{subject.name}.json")
    if (raw / f"{subject.name}.xml").is_file():
        run.junit_path = str(raw / f"{subject.name}.xml")
    if partial.is_file():
        run.partial_path = str(partial)
    return run


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def git_commit() -> str | None:
    """The checkout's short commit (None outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_suite(cfg: RunConfig, log=print, clock=time.monotonic, runner=None) -> list[SubjectRun]:
    """Run the chosen subjects in order within the suite's budget (plan_limit: each its share of the time left,
    shrunk rather than dropped) and record them in DIR/runs.json (with the commit they ran at, so a report
    rendered later still names it). `clock` and `runner` (run_subject's signature) are for tests."""
    run_one = runner or run_subject
    cfg.out.mkdir(parents=True, exist_ok=True)
    started, load, commit = _now(), [round(x, 2) for x in os.getloadavg()], git_commit()
    deadline = clock() + cfg.budget_s
    runs = []
    for position, name in enumerate(cfg.only):
        subject = cfg.subjects[name]
        left = deadline - clock()
        remaining = [cfg.subjects[n] for n in cfg.only[position:]]
        limit, scale = plan_limit(subject, remaining, left, cfg.quick)
        if limit < 5:
            run = SubjectRun(name, subject.file, "none", "timeout", reason="suite time budget spent before it ran")
        else:
            log(f"[benchmarks] {name}: running {subject.file} (limit {limit:.0f} s"
                + (f", scale {scale:.2f}" if scale < 1 else "") + ")")
            run = run_one(subject, cfg, limit, scale)
        log(f"[benchmarks] {name}: {run.status} in {run.seconds:.0f} s{' (' + run.reason + ')' if run.reason else ''}")
        runs.append(run)
    (cfg.out / RUNS_FILE).write_text(json.dumps({"quick": cfg.quick, "budget_s": cfg.budget_s,
                                                 "started": started, "finished": _now(),
                                                 "load_average_at_start": load, "git_commit": commit,
                                                 "subjects": [asdict(r) for r in runs]}, indent=1))
    return runs
