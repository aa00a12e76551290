"""Benchmark report, render: the results.json structure as markdown (report.md and the README section)."""
from __future__ import annotations

from typing import Any

def fmt(column: str, value: Any) -> str:
    """Table cell text: ratios as 1.23x, fractions as percentages, numbers to 3-4 significant digits."""
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value).replace("|", "\\|")
    if column == "speedup":
        return f"{value:.2f}x"
    if column.endswith("fraction"):
        return f"{value:.1%}" if value < 0.1 else f"{value:.0%}"
    if isinstance(value, int):
        return str(value)
    magnitude = abs(value)
    return f"{value:.0f}" if magnitude >= 100 else f"{value:.1f}" if magnitude >= 10 else f"{value:.2f}" \
        if magnitude >= 0.1 else f"{value:.3g}"


def markdown_table(columns: list[tuple[str, str]], rows: list[dict[str, Any]]) -> str:
    """A GitHub markdown table."""
    head = "| " + " | ".join(h for _, h in columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "\n".join("| " + " | ".join(fmt(c, r.get(c)) for c, _ in columns) + " |" for r in rows) + "\n"


def machine_name(results: dict[str, Any]) -> str:
    """"CPU model (N cores)" plus the GPU card when one was used."""
    m = results["machine"]
    name = f"{m['cpu']} ({m['cores']} cores, {m['memory_gib']} GiB)"
    return name + (f" + {', '.join(m['gpu']['names'])}" if m.get("gpu") else "")


def render_markdown(results: dict[str, Any], images: str = "", level: int = 1, title: bool = True) -> str:
    """The report as markdown; `images` prefixes plot file names, `level` is the top heading's level (sections
    one below it), `title` False leaves the top heading to the caller."""
    h = "#" * level
    m, v = results["machine"], results["versions"]
    gpu = m.get("gpu")
    lines = [f"{h} Benchmark report ({results['mode']} suite)", ""] if title else []
    lines += [f"Measured {results['created']} on **{machine_name(results)}**"
             f"{', commit ' + v['git_commit'] if v.get('git_commit') else ''}. Speed-up = time of the PyTorch "
             "reference measured in the same run / time of the case (above 1: faster). \"of fp32 GEMM peak\" is "
             "throughput as a fraction of the best fp32 GEMM rate measured in this run: by the bench file in its "
             "own process where it measures one (listed under its table, as are its other *_fraction columns' "
             "denominators), else by the machine subject.", "",
             f"{h}# Machine", "",
             markdown_table([("k", "item"), ("v", "value")], [
                 {"k": "CPU", "v": m["cpu"]}, {"k": "CPU flags that matter here",
                                               "v": ", ".join(m.get("cpu_flags") or []) or None},
                 {"k": "cores", "v": m["cores"]},
                 {"k": "memory", "v": f"{m['memory_gib']} GiB"}, {"k": "OS", "v": m["os"]},
                 {"k": "Python", "v": m["python"]}, {"k": "torch threads", "v": m["torch_threads"]},
                 {"k": "load average (1/5/15 min) at the start of the run",
                  "v": " / ".join(map(str, m["load_average"])) if m.get("load_average") else None},
                 {"k": "GPU", "v": ", ".join(gpu["names"]) + f" (CUDA {gpu['cuda']})" if gpu else "none"}]),
             f"{h}# Backends", "",
             "The fast paths this run could time; the bench files time every available one and skip the rest.", "",
             markdown_table([("backend", "backend"), ("available", "available"), ("reason", "skipped because")],
                            [{**r, "available": "yes" if r["available"] else "no"}
                             for r in results.get("backends", [])]),
             f"{h}# Versions", "",
             markdown_table([("k", "package"), ("v", "version")],
                            [{"k": k, "v": val or "not installed"} for k, val in v.items()]),
             f"{h}# Subjects", "",
             markdown_table([("name", "subject"), ("file", "file"), ("status", "status"), ("seconds", "seconds"),
                             ("n", "figures"), ("skipped", "skipped"), ("failed", "failed"), ("note", "note")],
                            [{"name": name, "file": s["file"], "status": s["status"], "seconds": s["seconds"],
                              "n": len(s["rows"]), "skipped": len(s["skipped"]), "failed": len(s["failed"]),
                              "note": "; ".join(filter(None, [s.get("reason"), s.get("selection") and (
                                  f"arguments: {s['selection']}" if s["kind"] == "script"
                                  else f"quick selection: -k '{s['selection']}'")]))}
                             for name, s in results["subjects"].items()])]
    for name, s in results["subjects"].items():
        lines += [f"{h}# {name}", "", f"`{s['command'] or s['file']}`: **{s['status']}**"
                  f"{' (' + s['reason'] + ')' if s.get('reason') else ''}.", ""]
        if s.get("settings"):
            lines += ["Settings: " + ", ".join(f"{k}={val}" for k, val in s["settings"].items() if k != "out"), ""]
        if s.get("own_limits"):
            lines += ["Machine limits measured in this subject's own process: " + ", ".join(
                f"{k}={fmt(k, val)}" for k, val in s["own_limits"].items()), ""]
        refs = {r.get("reference") for r in s["rows"]} if ("reference", "reference") not in map(tuple, s["columns"]) \
            else set()
        if len(refs) == 1 and None not in refs:
            lines += [f"Reference (speed-up 1.00x): `{refs.pop()}`, measured in the same process.", ""]
        if s["rows"]:
            lines.append(markdown_table([tuple(c) for c in s["columns"]], s["rows"]))
        for plot in s.get("plots", []):
            lines += [f"![{name}]({images}{plot})", ""]
        if s["skipped"]:
            lines += ["Skipped:", ""] + [f"- `{x['test']}`: {x['reason']}" for x in s["skipped"]] + [""]
        if s["failed"]:
            lines += ["Failed:", ""] + [f"- `{x['test']}`: {x['message']}" for x in s["failed"]] + [""]
        if s.get("log_tail"):
            lines += ["Last lines of its log:", "", "```", *s["log_tail"], "```", ""]
    lines += [f"{h}# GPU", "", f"Ran on {', '.join(gpu['names'])} (CUDA {gpu['cuda']})." if gpu
              else "No GPU available in this run: the CUDA backends are marked unavailable in the Backends table "
              "above.", ""]
    return "\n".join(lines)

