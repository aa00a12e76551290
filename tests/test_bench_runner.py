"""The benchmark runner and report: a tiny real run (machine limits + a synthetic bench file) and the renderer on
fabricated pytest-benchmark JSON; README section insertion."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.readme_section import BEGIN, END, replace_section, section
from benchmarks.report import build_report
from benchmarks.runner import SUBJECTS, RunConfig, Subject, run_suite

REPO = Path(__file__).resolve().parent.parent
TINY_ENV = {"BENCH_GEMM_N": "128", "BENCH_MEM_MIB": "8"}

SYNTHETIC = '''
import pytest, time

@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_tower(benchmark, impl, batch):
    benchmark.group = f"tower batch {batch}"
    delay = (0.004 if impl == "reference" else 0.001) * batch
    benchmark.pedantic(time.sleep, args=(delay,), rounds=2, iterations=1)

@pytest.mark.skip(reason="no GPU in this run")
def test_tower_cuda(benchmark):
    benchmark(lambda: None)

def test_broken(benchmark):
    benchmark(lambda: 1 / 0)
'''


def _fabricated_case(name: str, group: str, params: dict, seconds: float, extra: dict) -> dict:
    stats = {"min": seconds, "max": seconds * 1.2, "mean": seconds * 1.1, "stddev": 0.0, "rounds": 3,
             "median": seconds * 1.1, "iqr": 0, "q1": seconds, "q3": seconds, "iqr_outliers": 0,
             "stddev_outliers": 0, "outliers": "0;0", "ld15iqr": seconds, "hd15iqr": seconds, "ops": 1 / seconds,
             "total": seconds * 3, "iterations": 1}
    return {"group": group, "name": name, "fullname": f"bench_x.py::{name}", "params": params, "param": None,
            "extra_info": extra, "stats": stats}


def _write_run(out: Path, cases: list[dict], limits_gflops: float) -> None:
    raw = out / "raw"
    raw.mkdir(parents=True)
    machine = [_fabricated_case("test_fp32_gemm", "machine limits", {}, 0.1,
                                {"limit": "fp32 GEMM", "value": limits_gflops, "unit": "GFLOP/s", "n": 512})]
    (raw / "machine.json").write_text(json.dumps({"benchmarks": machine}))
    (raw / "towers.json").write_text(json.dumps({"benchmarks": cases}))
    (raw / "towers.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite><testcase classname="b" name="test_vision[8-trt]">'
        '<skipped type="pytest.skip" message="TensorRT not installed" /></testcase></testsuite></testsuites>')
    runs = [{"name": "machine", "file": "m.py", "kind": "pytest", "status": "ok", "seconds": 1.0, "returncode": 0,
             "command": [], "selection": None, "json_path": str(raw / "machine.json"), "junit_path": None,
             "log_path": None, "reason": ""},
            {"name": "towers", "file": "t.py", "kind": "pytest", "status": "ok", "seconds": 2.0, "returncode": 0,
             "command": [], "selection": None, "json_path": str(raw / "towers.json"),
             "junit_path": str(raw / "towers.xml"), "log_path": None, "reason": ""},
            {"name": "serve", "file": "benchmarks/bench_gone.py", "kind": "none", "status": "missing",
             "seconds": 0.0, "returncode": None, "command": [], "selection": None, "json_path": None,
             "junit_path": None, "log_path": None, "reason": "benchmarks/bench_gone.py not present"}]
    (out / "runs.json").write_text(json.dumps({"quick": True, "subjects": runs}))


def test_report_from_fabricated_benchmark_json(tmp_path):
    ref_s, fast_s, gflop_per_item, gemm = 0.08, 0.02, 2.0, 100.0
    cases = [_fabricated_case(f"test_vision[{b}-{impl}]", f"vision batch {b}", {"batch": b, "impl": impl},
                              seconds * b, {"gflop_per_item": gflop_per_item})
             for b in (1, 8) for impl, seconds in (("torch-fp32", ref_s), ("onnx-fp32", fast_s))]
    _write_run(tmp_path, cases, gemm)
    report = build_report(tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())

    assert set(results) >= {"machine", "versions", "limits", "subjects", "mode"}
    assert results["limits"]["gemm_gflops"] == gemm
    towers = results["subjects"]["towers"]
    rows = {(r["batch"], r["impl"]): r for r in towers["rows"]}
    assert rows[(8, "onnx-fp32")]["speedup"] == pytest.approx(ref_s / fast_s)
    assert rows[(8, "torch-fp32")]["speedup"] == pytest.approx(1.0)
    items_per_s = 8 / (fast_s * 8)
    assert rows[(8, "onnx-fp32")]["throughput"] == pytest.approx(items_per_s)
    assert rows[(8, "onnx-fp32")]["limit_fraction"] == pytest.approx(items_per_s * gflop_per_item / gemm)
    assert towers["skipped"] == [{"test": "test_vision[8-trt]", "reason": "TensorRT not installed"}]
    assert results["subjects"]["serve"]["skipped"][0]["reason"] == "benchmarks/bench_gone.py not present"
    assert towers["plots"] == ["towers_throughput.png"] and (tmp_path / "towers_throughput.png").stat().st_size > 0

    text = report.read_text()
    assert {"backend": "PyTorch CPU fp32 (reference)", "available": True, "reason": ""} in results["backends"]
    for heading in ("## Machine", "## Backends", "## Versions", "## Subjects", "## machine", "## towers", "## serve",
                    "## GPU"):
        assert f"\n{heading}\n" in text
    assert f"{ref_s / fast_s:.2f}x" in text
    assert "`test_vision[8-trt]`: TensorRT not installed" in text
    assert "![towers](towers_throughput.png)" in text
    assert ("No GPU available in this run" in text) == (results["machine"]["gpu"] is None)


def test_readme_section_inserted_before_architecture_then_replaced(tmp_path):
    case = _fabricated_case("test_a[1-torch-fp32]", "g", {"batch": 1, "impl": "torch-fp32"}, 0.01, {})
    _write_run(tmp_path / "rep", [case], 50.0)
    build_report(tmp_path / "rep")
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nintro\n\n## Architecture\n\nboxes\n")
    body = section([tmp_path / "rep"], tmp_path / "docs" / "perf", readme)
    once = replace_section(readme.read_text(), body)
    assert once.index("## Performance") < once.index(BEGIN) < once.index(END) < once.index("## Architecture")
    assert "(docs/perf/cpu/towers_throughput.png)" in once
    assert (tmp_path / "docs" / "perf" / "cpu" / "towers_throughput.png").is_file()
    assert replace_section(once, body) == once  # idempotent: the marked block is replaced, not duplicated
    with pytest.raises(ValueError, match="only one of the markers"):
        replace_section(f"x\n{BEGIN}\n", body)


def test_runner_tiny_run_lists_skips_failures_and_missing(tmp_path, monkeypatch):
    for key, value in TINY_ENV.items():
        monkeypatch.setenv(key, value)
    bench = tmp_path / "bench_synthetic.py"
    bench.write_text(SYNTHETIC)
    subjects = {"machine": SUBJECTS["machine"], "synthetic": Subject("synthetic", str(bench), quick_timeout_s=60),
                "absent": Subject("absent", "benchmarks/bench_does_not_exist.py")}
    out = tmp_path / "out"
    runs = run_suite(RunConfig(out=out, quick=True, only=list(subjects), subjects=subjects), log=lambda _: None)
    assert [r.status for r in runs] == ["ok", "failed", "missing"]
    build_report(out)
    results = json.loads((out / "results.json").read_text())

    assert results["started"] <= results["created"] and len(results["machine"]["load_average"]) == 3
    limits = results["limits"]
    assert {"gemm_gflops", "gemm_gflops_1thread", "read_gbs", "copy_gbs"} <= set(limits)
    assert all(value > 0 for value in limits.values())
    synthetic = results["subjects"]["synthetic"]
    cases = {(r["impl"], r["batch"]) for r in synthetic["rows"]}
    assert cases == {(impl, batch) for impl in ("reference", "fast") for batch in (1, 4)}
    fast = next(r for r in synthetic["rows"] if r["impl"] == "fast" and r["batch"] == 4)
    assert fast["speedup"] > 1  # 1 ms vs 4 ms sleeps per item
    assert {"test": "test_tower_cuda", "reason": "no GPU in this run"} in synthetic["skipped"]
    assert [f["test"] for f in synthetic["failed"]] == ["test_broken"]
    assert results["subjects"]["absent"]["skipped"][0]["reason"].endswith("not present")
    text = (out / "report.md").read_text()
    assert "| synthetic |" in text and "no GPU in this run" in text and "ZeroDivisionError" in text


def test_cli_only_machine_and_bad_subject(tmp_path):
    env = {**os.environ, **TINY_ENV}
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--only", "machine", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["subjects"]) == ["machine"] and results["limits"]["gemm_gflops"] > 0
    assert "fp32 GEMM" in (tmp_path / "report.md").read_text()
    bad = subprocess.run([sys.executable, "-m", "benchmarks", "--only", "machine,gpuz", "--out", str(tmp_path)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "gpuz" in bad.stderr


HANGING = '''
import time

def test_fast(benchmark):
    benchmark.pedantic(time.sleep, args=(0.001,), rounds=2, iterations=1)

def test_hangs(benchmark):
    benchmark.pedantic(time.sleep, args=(300,), rounds=1, iterations=1)
'''


@pytest.mark.slow
def test_subject_past_its_limit_is_reported_with_the_cases_it_finished(tmp_path):
    bench = tmp_path / "bench_hangs.py"
    bench.write_text(HANGING)
    subjects = {"hangs": Subject("hangs", str(bench), quick_timeout_s=25)}
    out = tmp_path / "out"
    [run] = run_suite(RunConfig(out=out, quick=True, only=["hangs"], subjects=subjects), log=lambda _: None)
    assert run.status == "timeout" and "25 s limit" in run.reason
    build_report(out)
    hangs = json.loads((out / "results.json").read_text())["subjects"]["hangs"]
    assert [r["case"] for r in hangs["rows"]] == ["test_fast"]
    assert "**timeout**" in (out / "report.md").read_text()


def _add_script_subject(out: Path, name: str, data: dict) -> list[dict]:
    """Append a finished script-style subject whose JSON is `data` to the run in `out`; its report rows."""
    (out / "raw" / f"{name}.json").write_text(json.dumps(data))
    runs = json.loads((out / "runs.json").read_text())
    runs["subjects"].append({"name": name, "file": f"benchmarks/bench_{name}.py", "kind": "script",
                             "status": "ok", "seconds": 3.0, "returncode": 0, "command": [], "selection": None,
                             "json_path": str(out / "raw" / f"{name}.json"), "junit_path": None,
                             "log_path": None, "reason": ""})
    (out / "runs.json").write_text(json.dumps(runs))
    build_report(out)
    return json.loads((out / "results.json").read_text())["subjects"][name]["rows"]


def test_script_points_without_clients_render_as_rows(tmp_path):
    """Fine-tuning and distributed benchmarks write their own "points"; only the serving ones carry clients."""
    _write_run(tmp_path, [], 100.0)
    points = [{"model": "tiny", "mode": "stage2", "pairs_per_s": 900.0, "ratio_to_plain": 1.0},
              {"model": "tiny", "mode": "stage1", "pairs_per_s": 1800.0, "ratio_to_plain": 2.0}]
    rows = _add_script_subject(tmp_path, "finetune", {"points": points, "gpu_skipped": "no GPU"})
    assert [(r["mode"], r["pairs_per_s"]) for r in rows] == [("stage2", 900.0), ("stage1", 1800.0)]


def test_summary_object_renders_as_one_row(tmp_path):
    """The soak writes one summary object (its "rows" is the index size, not a list): scalars become one row."""
    _write_run(tmp_path, [], 100.0)
    summary = {"rows": 2000, "requests": 40, "lost_writes": 0, "latency": {"search": {"p50_ms": 3.0}}}
    assert _add_script_subject(tmp_path, "soak", summary) == [{"rows": 2000, "requests": 40, "lost_writes": 0}]


def test_report_names_the_commit_the_run_recorded(tmp_path):
    """A report rendered after later commits still names the commit the suite ran at."""
    _write_run(tmp_path, [], 100.0)
    runs = json.loads((tmp_path / "runs.json").read_text())
    (tmp_path / "runs.json").write_text(json.dumps({**runs, "git_commit": "abc1234"}))
    build_report(tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["versions"]["git_commit"] == "abc1234"
    assert ", commit abc1234." in (tmp_path / "report.md").read_text()


# ---- the suite's time budget (fake clock and subjects: nothing runs for minutes) -----------------------------------

def _fake_suite(tmp_path, budget_s, nominal, overrun=None):
    """Run a suite of fake subjects on a fake clock; each uses `overrun[name]` seconds (default: its whole limit)."""
    from benchmarks import runner as runner_module

    subjects = {name: Subject(name, f"benchmarks/{name}.py", quick_timeout_s=t, scaled_flags=("--rows",),
                              script_quick_args=("--rows", "2000")) for name, t in nominal.items()}
    now = [0.0]
    calls = []

    def fake_run(subject, cfg, limit, scale):
        used = min(limit, (overrun or {}).get(subject.name, limit))
        calls.append((subject.name, limit, scale, runner_module.scale_args(subject.script_quick_args,
                                                                            subject.scaled_flags, scale)))
        now[0] += used
        return runner_module.SubjectRun(subject.name, subject.file, "script", "ok", used, limit_s=limit, scale=scale)

    cfg = RunConfig(out=tmp_path / "out", quick=True, only=list(subjects), subjects=subjects, budget_s=budget_s)
    runs = run_suite(cfg, log=lambda line: None, clock=lambda: now[0], runner=fake_run)
    return runs, calls, now[0]


def test_tight_budget_shrinks_every_subject_instead_of_dropping_one(tmp_path):
    from benchmarks.runner import MIN_SCALE

    runs, calls, spent = _fake_suite(tmp_path, 200.0, {"a": 100.0, "b": 100.0, "c": 50.0, "d": 150.0})
    assert [r.status for r in runs] == ["ok"] * 4  # every subject ran
    assert spent <= 200.0 + 1e-9  # the suite kept its budget although each subject used its whole limit
    for name, limit, scale, args in calls:
        assert MIN_SCALE <= scale < 1 and limit < {"a": 100, "b": 100, "c": 50, "d": 150}[name]
        assert args == ["--rows", str(round(2000 * scale))]  # the subject's size shrinks with its share
    limits = {name: limit for name, limit, _, _ in calls}
    assert limits["a"] == pytest.approx(200 * 100 / 400)  # its share of the time left, by nominal limit
    assert json.loads((tmp_path / "out" / "runs.json").read_text())["budget_s"] == 200.0


def test_time_a_subject_leaves_unused_goes_to_the_rest(tmp_path):
    runs, calls, spent = _fake_suite(tmp_path, 200.0, {"a": 100.0, "b": 100.0, "c": 100.0}, overrun={"a": 10.0})
    limits = {name: (limit, scale) for name, limit, scale, _ in calls}
    assert limits["b"][0] == pytest.approx(190 / 2) and limits["c"][0] == pytest.approx(95)
    assert limits["b"][1] == pytest.approx(0.95)


def test_ample_budget_runs_every_subject_at_full_size(tmp_path):
    runs, calls, _ = _fake_suite(tmp_path, 1000.0, {"a": 100.0, "b": 50.0})
    assert [(name, limit, scale, args) for name, limit, scale, args in calls] == [
        ("a", 100.0, 1.0, ["--rows", "2000"]), ("b", 50.0, 1.0, ["--rows", "2000"])]


def test_quick_budget_default_and_bench_scale(monkeypatch):
    from benchmarks import params
    from benchmarks.runner import QUICK_BUDGET_S, scale_args

    assert RunConfig(out=Path("x"), quick=True).budget_s == QUICK_BUDGET_S == 480.0
    assert scale_args(("--minutes", "0.5", "--rows", "2000", "--x", "3"), ("--minutes", "--rows"), 0.5) == [
        "--minutes", "0.25", "--rows", "1000", "--x", "3"]
    monkeypatch.setenv(params.SCALE_ENV, "0.4")
    assert params.scaled(30_000, 5_000) == 12_000 and params.scaled(10, 5) == 5
    monkeypatch.setenv(params.SCALE_ENV, "junk")
    assert params.scale() == 1.0
