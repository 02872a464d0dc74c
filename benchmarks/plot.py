"""``python -m benchmarks plot``: PNG charts from the suites' JSON results.

- ``memory_*.json`` -> ``memory_*.png``: saved-for-backward bytes and peak bytes vs T, one line per
  method, log-scale y (naive BPTT grows linearly in T, LeapAlign stays flat: a log axis shows both).
- ``throughput_*.json`` -> ``throughput_*.png``: median iteration time vs T per method (log y) and,
  at T = 25 (or the largest T), each method's time split into rollout / gradient / other.
- ``kernels_*.json`` -> ``kernels_*.png``: per op, time of each implementation (log y).
Other result files (e.g. activations) are skipped with a note. Every PNG's title names the machine.
"""
from __future__ import annotations

import glob
import os
import sys
from collections import defaultdict
from typing import Any, Sequence

from benchmarks.options import RESULTS_DIR, parse_suite_args, suite_parser
from benchmarks.report import load_json

__all__ = ["main", "plot_file"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _machine_caption(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    gpu = (m.get("gpu") or {}).get("name")
    where = gpu or f"{m.get('cpu')} ({m.get('torch_threads')} threads)"
    cfg = doc["config"]
    what = (f"{cfg.get('model')} {cfg.get('dtype')} batch {cfg.get('batch_size')}" if "model" in cfg
            else f"shape {cfg.get('shape')} {cfg.get('dtype')}")
    return f"{what} | {where} | torch {m.get('torch')}"


def _series(records: Sequence[dict[str, Any]], key: str) -> dict[str, tuple[list[int], list[float]]]:
    by_method: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for rec in records:
        if rec.get("status") == "ok" and rec.get(key) is not None:
            by_method[rec["method"]].append((rec["steps"], float(rec[key])))
    return {m: ([t for t, _ in sorted(pts)], [v for _, v in sorted(pts)]) for m, pts in by_method.items()}


def _save(plt: Any, fig: Any, out: str, suptitle: str | None = None) -> str:
    """Optional figure title, tight layout, the PNG at 110 dpi; closes the figure and returns ``out``."""
    if suptitle is not None:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h")
_STYLES = ("-", "--", "-.", ":")


def _line_panel(ax: Any, records: Sequence[dict[str, Any]], key: str, scale: float, ylabel: str, title: str) -> None:
    """One line per method; distinct markers and dashes so methods with equal values stay visible."""
    for i, (method, (ts, vs)) in enumerate(_series(records, key).items()):
        ax.plot(ts, [v / scale for v in vs], marker=_MARKERS[i % len(_MARKERS)], linestyle=_STYLES[i % len(_STYLES)],
                markersize=7 - (i % 3), label=method)
    steps = sorted({rec["steps"] for rec in records})
    ax.set_xscale("log", base=2)
    ax.set_xticks(steps)
    ax.set_xticklabels([str(t) for t in steps])
    ax.minorticks_off()
    ax.set_xlabel("sampling steps T (log)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_yscale("log")
    ax.grid(True, which="major", alpha=0.3)


def plot_memory(doc: dict[str, Any], out: str) -> str:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    _line_panel(axes[0], doc["records"], "saved_bytes", 2**20, "MiB (log)", "bytes saved for backward")
    _line_panel(axes[1], doc["records"], "peak_bytes", 2**20, "MiB (log)", "peak memory of one iteration")
    axes[0].legend(fontsize=8)
    return _save(plt, fig, out, f"memory vs T — {_machine_caption(doc)}")


def plot_throughput(doc: dict[str, Any], out: str) -> str:
    plt = _pyplot()
    records = doc["records"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    _line_panel(axes[0], records, "seconds", 1.0, "seconds (log)", "median iteration time")
    axes[0].legend(fontsize=8)
    steps = sorted({r["steps"] for r in records})
    at = 25 if 25 in steps else max(steps)
    rows = [r for r in records if r["steps"] == at and r.get("status") == "ok"]
    names = [r["method"] for r in rows]
    bottom = [0.0] * len(rows)
    for key, colour in (("rollout_s", "#8fb3d9"), ("gradient_s", "#d98f8f"), ("other_s", "#bbbbbb")):
        values = [max(0.0, float(r.get(key) or 0.0)) for r in rows]
        axes[1].bar(names, values, bottom=bottom, label=key.replace("_s", ""), color=colour)
        bottom = [b + v for b, v in zip(bottom, values)]
    axes[1].set_ylabel("seconds")
    axes[1].set_title(f"split of one iteration at T = {at}")
    axes[1].legend(fontsize=8)
    axes[1].tick_params(axis="x", rotation=30, labelsize=8)
    return _save(plt, fig, out, f"time vs T — {_machine_caption(doc)}")


def plot_kernels(doc: dict[str, Any], out: str) -> str:
    plt = _pyplot()
    records = [r for r in doc["records"] if r.get("status") == "ok" and r.get("seconds")]
    ops = sorted({r["op"] for r in records})
    impls = sorted({r["impl"] for r in records})
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(ops) + 2), 4.8))
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        xs, ys = [], []
        for j, op in enumerate(ops):
            hit = [r for r in records if r["op"] == op and r["impl"] == impl]
            if hit:
                xs.append(j + i * width)
                ys.append(1e3 * float(hit[0]["seconds"]))
        ax.bar(xs, ys, width=width, label=impl)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(ops))])
    ax.set_xticklabels(ops, rotation=20, fontsize=8)
    ax.set_ylabel("ms per call, forward + backward (log)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(f"fused ops — {_machine_caption(doc)}", fontsize=9)
    return _save(plt, fig, out)


_PLOTTERS = {"memory": plot_memory, "throughput": plot_throughput, "kernels": plot_kernels}


def plot_file(path: str, out_dir: str | None = None) -> str | None:
    """Plot one result file; returns the PNG path, or None when its suite has no plotter."""
    doc = load_json(path)
    plotter = _PLOTTERS.get(doc["suite"])
    if plotter is None:
        return None
    out_dir = out_dir or os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + ".png")
    return plotter(doc, out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = suite_parser("plot", __doc__, threads=False)
    parser.add_argument("files", nargs="*", help="result JSON files (default: every *.json under --results)")
    parser.add_argument("--results", default=RESULTS_DIR, help="folder to scan for result JSON files")
    parser.add_argument("--out", default=None, help="folder for PNGs (default: next to each JSON)")
    args, _ = parse_suite_args(parser, argv)
    files = args.files or sorted(glob.glob(os.path.join(args.results, "*.json")))
    if not files:
        print(f"no result JSON files found (looked in {args.results}); run a suite first", file=sys.stderr)
        return 1
    for path in files:
        try:
            png = plot_file(path, args.out)
        except ValueError as exc:
            print(f"skip {path}: {exc}")
            continue
        print(f"{path} -> {png}" if png else f"skip {path}: no chart for this suite")
    return 0
