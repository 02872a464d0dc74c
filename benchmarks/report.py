"""Result files: one JSON document per suite run, its Markdown twin, and the table printed to stdout.

Shape of every JSON result (``tests/test_benchmarks_smoke.py`` checks it)::

    {"suite": "memory", "machine": {...}, "config": {...},
     "records": [{"method": ..., "steps": ..., "status": "ok" | "oom" | "error" | "skipped", ...}],
     "summary": {...}}

Records are flat dicts of JSON scalars (plus the list of repeat times and a small ``metrics`` dict)
so they load into a dataframe as they are.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

__all__ = ["Column", "ResultDoc", "write_json", "write_markdown", "write_results", "render_table", "format_bytes",
           "format_kib", "format_ms", "format_ratio", "load_json"]

RESULT_KEYS = ("suite", "machine", "config", "records", "summary")


def format_bytes(n: float | int | None) -> str:
    """Bytes as MiB with 2 decimals (the unit our figures quote); ``-`` for missing values."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    return f"{n / 2**20:.2f}"


def format_kib(n: float | int) -> str:
    """Bytes as KiB without decimals (per-op figures)."""
    return f"{n / 1024:.0f}"


def format_ms(seconds: float) -> str:
    """Seconds as milliseconds with 3 decimals."""
    return f"{1e3 * seconds:.3f}"


def format_ratio(x: float) -> str:
    """A speed or memory ratio (``x eager``) with 2 decimals."""
    return f"{x:.2f}"


def format_float(x: float | int | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"


@dataclass(frozen=True)
class Column:
    """One table column: record key, header and how to print a value."""

    key: str
    header: str
    fmt: Callable[[Any], str] = str


@dataclass
class ResultDoc:
    """A suite's result before it is written: what ran, where, and what came out."""

    suite: str
    machine: dict[str, Any]
    config: dict[str, Any]
    records: list[dict[str, Any]]
    summary: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "machine": self.machine,
            "config": self.config,
            "records": self.records,
            "summary": self.summary,
        }


def write_json(path: str, doc: ResultDoc) -> str:
    """Write ``doc`` to ``path`` (parent folders created); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(doc.as_dict(), fh, indent=2, sort_keys=False, default=_json_default)
        fh.write("\n")
    return path


def load_json(path: str) -> dict[str, Any]:
    """Read a result file and check it has the five top-level keys every suite writes."""
    with open(path, encoding="utf-8") as fh:
        doc = json.load(fh)
    missing = [k for k in RESULT_KEYS if k not in doc]
    if missing:
        raise ValueError(f"{path} is not a benchmark result: missing keys {missing}, expected {list(RESULT_KEYS)}")
    return doc


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def render_table(records: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """A GitHub-flavoured Markdown table (also readable on a terminal)."""
    header = "| " + " | ".join(c.header for c in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    rows = []
    for rec in records:
        cells = []
        for c in columns:
            value = rec.get(c.key)
            cells.append("-" if value is None else c.fmt(value))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join([header, rule, *rows])


def _machine_lines(machine: dict[str, Any]) -> list[str]:
    gpu = machine.get("gpu")
    gpu_text = "none" if not gpu else f"{gpu.get('name')} ({format_bytes(gpu.get('total_memory_bytes'))} MiB, CUDA {gpu.get('cuda')})"
    return [
        f"- command: `{machine.get('command')}`",
        f"- when (UTC): {machine.get('utc')}; git commit: {machine.get('git_commit')}",
        f"- CPU: {machine.get('cpu')} ({machine.get('cpu_count')} cores visible, {machine.get('torch_threads')} torch threads); "
        f"RAM: {format_bytes(machine.get('ram_bytes'))} MiB; load average at the end (1/5/15 min): "
        f"{machine.get('load_average_1_5_15')}",
        f"- GPU: {gpu_text}",
        f"- torch {machine.get('torch')}, triton {machine.get('triton')}, diffusers {machine.get('diffusers')}, "
        f"python {machine.get('python')}, {machine.get('platform')}",
    ]


def write_markdown(
    path: str,
    doc: ResultDoc,
    columns: Sequence[Column],
    title: str,
    notes: Sequence[str] = (),
) -> str:
    """The Markdown twin of the JSON: title, machine, config, table, summary and notes."""
    lines = [f"# {title}", "", "## Machine", "", *_machine_lines(doc.machine), "", "## Config", ""]
    lines += [f"- {k}: `{v}`" for k, v in doc.config.items()]
    lines += ["", "## Results", "", render_table(doc.records, columns), ""]
    if doc.summary:
        lines += ["## Summary", ""]
        lines += [f"- {k}: {_summary_value(v)}" for k, v in doc.summary.items()]
        lines.append("")
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))
    return path


def write_results(
    json_path: str,
    md_path: str,
    doc: ResultDoc,
    columns: Sequence[Column],
    title: str,
    notes: Sequence[str] = (),
) -> None:
    """Write the JSON and its Markdown twin, print the table and where they went (every suite ends so)."""
    write_json(json_path, doc)
    write_markdown(md_path, doc, columns, title=title, notes=notes)
    print(render_table(doc.records, columns))
    print(f"wrote {json_path} and {md_path}")


def _summary_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_summary_value(x)}" for k, x in v.items())
    return str(v)
