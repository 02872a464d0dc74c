"""``python -m benchmarks plan``: planned memory, FLOPs and roofline time of FLUX.1-dev training, per method.

For each point of the matrix (method x resolution x train mode) ``leapalign.plan`` builds the real
FLUX.1-dev transformer, VAE and reward (PickScore_v1's CLIP ViT-H/14) from their configs under fake
tensors and runs one training micro-batch + optimiser step through the trainer's own code (issue
14). Fixed for every point: T = 25, batch 1 per GPU, no accumulation, bf16 weights and autocast,
fp32 trainable weights + AdamW + EMA, transformer gradient checkpointing as the README's FLUX.1-dev
configs set it (``--no-gradient-checkpointing`` turns it off). Method names and objective options
are ``benchmarks.workload.METHODS``'s, so they mean what they mean in the other suites.

Each point runs in a fresh interpreter (the fake process group of FSDP2 and the RSS figure are per
process) and its record is written to ``<json stem>_points/`` as soon as it finishes; a rerun
skips the points found there (``--redo`` replans them). For full fine-tuning the smallest FSDP2
world size (of ``--world-sizes``) whose per-rank peak fits an 80 GB GPU is searched too, each size a
re-plan (``--no-world-search`` skips it); a size whose sharded weights, gradients, optimiser state
and EMA alone exceed 80 GB is not planned.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any, Sequence

from benchmarks.machine import machine_info
from benchmarks.options import REPO_ROOT, add_output_args, output_paths, parse_suite_args, suite_parser
from benchmarks.report import Column, ResultDoc, format_float, write_results
from benchmarks.workload import METHODS, resolve_methods

__all__ = ["main", "point_config", "point_key", "plan_point", "fsdp_lower_bound",
           "COLUMNS", "MATRIX_METHODS"]

_RECORD_MARK = "@@PLAN_RECORD "
GIB = 2**30
MATRIX_METHODS = ("leapalign", "leapalign+kernels", "drtune", "draft_lv", "refl", "bptt", "bptt_ckpt")
RESOLUTIONS = (512, 720, 1024)
TRAIN_MODES = ("lora", "full")
WORLD_SIZES = (1, 2, 4, 8, 16)
#: The memory size the FSDP2 world-size search answers for (the issue: "the smallest FSDP2 world size that fits 80 GB").
SEARCH_MEMORY = "80GB"
_STATE_KEYS = ("params", "grads", "optimizer", "ema")


def _gib(n: Any) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def _tflop(n: Any) -> str:
    return "-" if n is None else f"{n / 1e12:.1f}"


def _h100(d: Any) -> str:
    return "-" if not isinstance(d, dict) or d.get("H100-SXM") is None else f"{d['H100-SXM']:.2f}"


def _fits(d: Any) -> str:
    return "-" if not isinstance(d, dict) else " ".join(k for k, v in d.items() if v) or "none"


COLUMNS = (
    Column("method", "method"), Column("resolution", "px"), Column("train_mode", "train"),
    Column("world_size", "ranks"), Column("peak_bytes", "peak/GPU (GiB)", _gib), Column("peak_phase", "peak phase"),
    Column("flops_per_iteration", "TFLOP/iter", _tflop), Column("roofline_s", "H100 roofline s/iter", _h100),
    Column("fits", "fits", _fits), Column("fsdp_min_world_size_80gb", "FSDP2 ranks for 80 GB"),
    Column("plan_seconds", "plan s", format_float), Column("rss_peak_bytes", "plan RSS (GiB)", _gib),
    Column("status", "status"),
)


def point_key(method: str, resolution: int, train_mode: str, world_size: int = 1) -> str:
    """The file name stem of one point's record: ``leapalign+kernels_720_full_w4``."""
    return f"{method}_{resolution}_{train_mode}_w{world_size}"


def point_config(method: str, resolution: int, train_mode: str, *, steps: int = 25, lora_rank: int = 64,
                 gradient_checkpointing: bool = True, model: str = "flux-dev", reward: str | None = None,
                 mixed_precision: str | None = None, trainable_dtype: str = "float32") -> Any:
    """The :class:`LeapAlignConfig` of one point: the README's FLUX.1-dev LoRA config, batch 1, no accumulation.

    ``model`` is ``flux-dev`` (the built-in FLUX.1-dev configs) or a tiny_flux name (``test``:
    bf16 mixed precision off and a weightless reward, so the smoke test takes seconds). ``reward``
    (``pickscore`` | ``brightness``) and ``mixed_precision`` (``bf16`` | ``no``) default to those.
    """
    from leapalign.training.config import LeapAlignConfig

    m = METHODS[method]
    tiny = model != "flux-dev"
    reward = reward or ("brightness" if tiny else "pickscore")
    specs = [{"name": "pickscore", "path": None, "kwargs": {"scale": 1.0}}] if reward == "pickscore" else [{"name": reward}]
    mixed_precision = mixed_precision or ("no" if tiny else "bf16")
    return LeapAlignConfig(
        output_dir="/tmp/leapalign-plan-bench", prompts=["a photo"], device="cpu",
        mixed_precision=mixed_precision, model_dtype="float32" if tiny else "bfloat16",
        model_path=f"tiny:{model}" if tiny else "", model_height=resolution, model_width=resolution,
        model_gradient_checkpointing=gradient_checkpointing, model_use_leapkernels=m.kernels,
        objective_name=m.objective, objective={"num_steps": steps, **m.options}, reward_specs=specs,
        train_mode=train_mode, lora_rank=lora_rank, lora_alpha=lora_rank, train_batch_size=1,
        train_gradient_accumulation_steps=1, train_ema_decay=0.995, train_num_steps=300,
        train_trainable_dtype=trainable_dtype,
    )


def point_settings(model: str = "flux-dev", steps: int = 25, lora_rank: int = 64, gradient_checkpointing: bool = True,
                   reward: str | None = None, mixed_precision: str | None = None,
                   trainable_dtype: str = "float32") -> dict[str, Any]:
    """Everything but the point's coordinates that its plan depends on, defaults resolved (checked on resume)."""
    tiny = model != "flux-dev"
    return {"model": model, "steps": steps, "lora_rank": lora_rank, "gradient_checkpointing": gradient_checkpointing,
            "reward": reward or ("brightness" if tiny else "pickscore"),
            "mixed_precision": mixed_precision or ("no" if tiny else "bf16"), "trainable_dtype": trainable_dtype}


def _same_settings(rec: dict[str, Any], settings: dict[str, Any]) -> bool:
    """Whether a finished record was planned with ``settings`` (records of the first run carry none: their
    fields are compared and the rest is the defaults of that run, pickscore / bf16 / float32)."""
    if "settings" in rec:
        return rec["settings"] == settings
    legacy = point_settings("flux-dev", rec.get("steps"), settings["lora_rank"], rec.get("gradient_checkpointing"))
    if rec.get("train_mode") == "lora":
        legacy["lora_rank"] = rec.get("lora_rank")
    return rec.get("model") == "FLUX.1-dev" and legacy == settings


def plan_point(method: str, resolution: int, train_mode: str, world_size: int = 1, **kw: Any) -> dict[str, Any]:
    """Plan one point in this process and return its flat record (raises on planner errors)."""
    from leapalign.training.plan import plan

    model = kw.get("model", "flux-dev")
    cfg = point_config(method, resolution, train_mode, **kw)
    t0 = time.perf_counter()
    report = plan(cfg, "H100-SXM", world_size, model=None if model == "flux-dev" else f"tiny:{model}", suggest=False)
    seconds = time.perf_counter() - t0
    d = report.to_dict()
    return {
        "method": method, "resolution": resolution, "train_mode": train_mode, "world_size": world_size,
        "status": "ok", "model": d["model"], "steps": d["num_steps"], "lora_rank": d["lora_rank"],
        "gradient_checkpointing": d["gradient_checkpointing"], "leapkernels": d["leapkernels"],
        "peak_bytes": d["peak_bytes"], "peak_phase": d["peak_phase"], "breakdown": d["breakdown"],
        "saved_bytes": d["saved_bytes"], "flops": d["flops"], "flops_per_iteration": d["flops_per_iteration"],
        "weight_traffic_bytes": d["weight_traffic_bytes"], "roofline_s": d["roofline_s"],
        "run_roofline_s": d["run_roofline_s"], "fits": d["fits_by_memory"], "notes": d["notes"],
        "settings": point_settings(**kw), "plan_seconds": round(seconds, 1),
        # ru_maxrss is KiB on Linux: the whole planning process's high-water mark (interpreter and imports included)
        "rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def fsdp_lower_bound(record: dict[str, Any], world_size: int) -> int:
    """Bytes per rank that sharding cannot go below: the unsharded plan's weights, gradients, AdamW state and EMA / N."""
    state = sum(int(record.get("breakdown", {}).get(k, 0)) for k in _STATE_KEYS)
    return state // world_size


def _usable(memory: str) -> int:
    from leapalign.training.gpus import GPUS, usable_bytes
    from leapalign.training.plan import MEMORY_SIZES

    return usable_bytes(GPUS[MEMORY_SIZES[memory]].memory_bytes)


def _args_settings(args: argparse.Namespace) -> dict[str, Any]:
    return point_settings(args.model, args.steps, args.lora_rank, args.gradient_checkpointing, args.reward,
                          args.mixed_precision, args.trainable_dtype)


def _point_argv(args: argparse.Namespace, method: str, resolution: int, mode: str, world: int) -> list[str]:
    argv = [sys.executable, "-m", "benchmarks", "plan", "--point", method, str(resolution), mode, str(world),
            "--model", args.model, "--steps", str(args.steps), "--lora-rank", str(args.lora_rank)]
    if not args.gradient_checkpointing:
        argv.append("--no-gradient-checkpointing")
    for flag, value in (("--reward", args.reward), ("--mixed-precision", args.mixed_precision)):
        if value is not None:
            argv += [flag, value]
    if args.trainable_dtype != "float32":
        argv += ["--trainable-dtype", args.trainable_dtype]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    return argv


def _run_point(args: argparse.Namespace, points_dir: str, method: str, resolution: int, mode: str,
               world: int) -> dict[str, Any]:
    """One point's record: read from ``points_dir`` when finished before, else planned in a fresh interpreter."""
    path = os.path.join(points_dir, point_key(method, resolution, mode, world) + ".json")
    if os.path.exists(path) and not args.redo:
        with open(path, encoding="utf-8") as fh:
            rec = json.load(fh)
        if rec.get("status") == "ok" and _same_settings(rec, _args_settings(args)):
            print(f"  plan {point_key(method, resolution, mode, world)}: done before ({path})", flush=True)
            return rec
    base = {"method": method, "resolution": resolution, "train_mode": mode, "world_size": world}
    if args.collect:
        return {**base, "status": "not planned"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(_point_argv(args, method, resolution, mode, world), capture_output=True, text=True,
                              timeout=args.point_timeout, cwd=REPO_ROOT)
        rec = next((json.loads(line[len(_RECORD_MARK):]) for line in reversed(proc.stdout.splitlines())
                    if line.startswith(_RECORD_MARK)), None)
        if rec is None:
            rec = {**base, "status": "error", "error": f"exit {proc.returncode}: {proc.stderr[-800:]}"}
    except subprocess.TimeoutExpired:
        rec = {**base, "status": "timeout", "error": f"point exceeded --point-timeout={args.point_timeout}s"}
    rec["wall_seconds"] = round(time.perf_counter() - t0, 1)
    os.makedirs(points_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(rec, fh, indent=2)
        fh.write("\n")
    print(f"  plan {point_key(method, resolution, mode, world)}: {rec['status']} peak={_gib(rec.get('peak_bytes'))} GiB "
          f"{_tflop(rec.get('flops_per_iteration'))} TFLOP H100 {_h100(rec.get('roofline_s'))} s "
          f"({rec['wall_seconds']}s, RSS {_gib(rec.get('rss_peak_bytes'))} GiB)", flush=True)
    return rec


def world_search(args: argparse.Namespace, points_dir: str, rec: dict[str, Any]) -> None:
    """Fill ``rec['fsdp_search']`` and ``rec['fsdp_min_world_size_80gb']`` (None: no size of ``--world-sizes`` fits)."""
    usable = _usable(SEARCH_MEMORY)
    search: list[dict[str, Any]] = []
    found = None
    for n in args.world_sizes:
        if n == rec["world_size"]:
            entry = {"world_size": n, "peak_bytes": rec["peak_bytes"], "fits_80gb": rec["fits"][SEARCH_MEMORY]}
        elif fsdp_lower_bound(rec, n) > usable:
            entry = {"world_size": n, "peak_bytes": None, "fits_80gb": False,
                     "skipped": f"sharded state alone {_gib(fsdp_lower_bound(rec, n))} GiB > usable {_gib(usable)} GiB"}
        else:
            sub = _run_point(args, points_dir, rec["method"], rec["resolution"], rec["train_mode"], n)
            if sub["status"] == "not planned":  # --collect: the search stops where the planning stopped
                break
            entry = {"world_size": n, "peak_bytes": sub.get("peak_bytes"), "status": sub["status"],
                     "fits_80gb": bool(sub.get("fits", {}).get(SEARCH_MEMORY)) if sub["status"] == "ok" else None,
                     "plan_seconds": sub.get("plan_seconds"), "rss_peak_bytes": sub.get("rss_peak_bytes")}
        search.append(entry)
        if entry["fits_80gb"]:
            found = n
            break
    rec["fsdp_search"] = search
    rec["fsdp_min_world_size_80gb"] = found


def _selected(args: argparse.Namespace) -> list[tuple[str, int, str]]:
    if args.points:
        out = []
        for p in args.points:
            try:
                method, res, mode = p.split("/")
                out.append((resolve_methods([method])[0].name, int(res), mode))
            except ValueError as exc:
                raise ValueError(f"--points entry {p!r}: expected METHOD/RESOLUTION/MODE, e.g. leapalign/720/lora ({exc})") from None
        return out
    methods = [m.name for m in resolve_methods(args.methods)]
    return [(m, r, t) for t in args.train_modes for r in args.resolutions for m in methods]


def _missing(args: argparse.Namespace, done: set[tuple[str, int, str]]) -> list[str]:
    full = [(m, r, t) for t in TRAIN_MODES for r in RESOLUTIONS for m in MATRIX_METHODS]
    return [f"{m}/{r}/{t}" for m, r, t in full if (m, r, t) not in done]


def plot_plan(records: Sequence[dict[str, Any]], out: str, caption: str) -> str | None:
    """Bars: peak memory per GPU per method, grouped by resolution, one panel per train mode; the 80 GB line."""
    from benchmarks.plot import _pyplot, _save

    ok = [r for r in records if r.get("status") == "ok" and r.get("peak_bytes") is not None]
    if not ok:
        return None
    plt = _pyplot()
    modes = [m for m in TRAIN_MODES if any(r["train_mode"] == m for r in ok)]
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.4), squeeze=False)
    line = _usable(SEARCH_MEMORY) / GIB
    for ax, mode in zip(axes[0], modes):
        rows = [r for r in ok if r["train_mode"] == mode]
        methods = [m for m in MATRIX_METHODS if any(r["method"] == m for r in rows)]
        methods += sorted({r["method"] for r in rows} - set(methods))
        res = sorted({r["resolution"] for r in rows})
        width = 0.8 / max(1, len(methods))
        for i, m in enumerate(methods):
            xs, ys = [], []
            for j, px in enumerate(res):
                hit = [r for r in rows if r["method"] == m and r["resolution"] == px]
                if hit:
                    xs.append(j + (i - (len(methods) - 1) / 2) * width)
                    ys.append(hit[0]["peak_bytes"] / GIB)
            bars = ax.bar(xs, ys, width=width, label=m, alpha=0.35 if mode == "full" else 1.0)
            if mode == "full":  # the per-rank peak at the smallest FSDP2 size that fits 80 GB, hatched on top
                for x, px in zip(xs, [px for px in res if any(r["method"] == m and r["resolution"] == px for r in rows)]):
                    rec = next(r for r in rows if r["method"] == m and r["resolution"] == px)
                    n = rec.get("fsdp_min_world_size_80gb")
                    hit = [e for e in rec.get("fsdp_search", []) if e.get("world_size") == n]
                    if n and hit and hit[0].get("peak_bytes"):
                        ax.bar([x], [hit[0]["peak_bytes"] / GIB], width=width, hatch="//", edgecolor="white",
                               color=bars.patches[0].get_facecolor()[:3])
                        ax.annotate(f"FSDP2 x{n}: {hit[0]['peak_bytes'] / GIB:.0f} GiB/rank", (x, hit[0]["peak_bytes"] / GIB),
                                    textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
        ax.axhline(line, color="red", linestyle="--", linewidth=1, label=f"80 GB GPU (usable {line:.0f} GiB)")
        ax.set_xticks(range(len(res)), [f"{px}x{px}" for px in res])
        ax.set_ylabel("planned peak per GPU (GiB)")
        ax.set_title(f"{mode} (1 GPU)" if mode == "lora"
                     else f"{mode} fine-tune (pale: 1 GPU unsharded; hatched: per rank, FSDP2)", fontsize=9)
        ax.legend(fontsize=7)
    return _save(plt, fig, out, caption)


def build_parser() -> argparse.ArgumentParser:
    parser = suite_parser("plan", __doc__)
    parser.add_argument("--model", default="flux-dev", help="flux-dev (FLUX.1-dev configs) or a tiny_flux name (test) for smoke runs")
    parser.add_argument("--methods", nargs="+", default=list(MATRIX_METHODS), help=f"known: {', '.join(METHODS)}; or 'all'")
    parser.add_argument("--resolutions", type=int, nargs="+", default=list(RESOLUTIONS), help="square image sizes in pixels")
    parser.add_argument("--train-modes", nargs="+", default=list(TRAIN_MODES), choices=TRAIN_MODES)
    parser.add_argument("--points", nargs="+", default=None, metavar="METHOD/RES/MODE",
                        help="plan only these points (e.g. leapalign/720/full); overrides the three lists above")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps T")
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                        help="plan without transformer gradient checkpointing (the README's configs turn it on)")
    parser.add_argument("--reward", default=None, choices=("pickscore", "brightness"),
                        help="reward planned (default: pickscore = CLIP ViT-H/14 on flux-dev, brightness on tiny models)")
    parser.add_argument("--mixed-precision", default=None, choices=("bf16", "no"),
                        help="autocast (default: bf16 on flux-dev, no on tiny models)")
    parser.add_argument("--trainable-dtype", default="float32", choices=("float32", "bfloat16"),
                        help="dtype of trainable weights, AdamW state and EMA")
    parser.add_argument("--jobs", type=int, default=1, help="points planned at once (one process each)")
    parser.add_argument("--no-world-search", dest="world_search", action="store_false",
                        help="full fine-tune: do not search the smallest FSDP2 world size that fits 80 GB")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=list(WORLD_SIZES))
    parser.add_argument("--redo", action="store_true", help="replan points whose record exists already")
    parser.add_argument("--note", action="append", default=[], help="a line added to the Markdown's notes (repeatable)")
    parser.add_argument("--collect", action="store_true",
                        help="plan nothing: write the result files from the points finished before (the rest listed as missing)")
    parser.add_argument("--point-timeout", type=float, default=1800.0, help="seconds per planned point")
    parser.add_argument("--point", nargs=4, metavar=("METHOD", "RES", "MODE", "WORLD"), default=None, help=argparse.SUPPRESS)
    add_output_args(parser, "plan_flux_dev.json")
    return parser


def _suite_config(args: argparse.Namespace, points_dir: str) -> dict[str, Any]:
    """The settings every point of this run shares, as the result files record them."""
    tiny = args.model != "flux-dev"
    reward = args.reward or ("brightness" if tiny else "pickscore")
    return {"model": args.model, "steps": args.steps, "batch_size_per_gpu": 1, "grad_accumulation": 1,
            "lora_rank": args.lora_rank, "gradient_checkpointing": args.gradient_checkpointing,
            "mixed_precision": args.mixed_precision or ("no" if tiny else "bf16"), "trainable_dtype": args.trainable_dtype,
            "reward": "PickScore_v1 (CLIP ViT-H/14 shapes)" if reward == "pickscore" else reward,
            "world_search": args.world_search, "world_sizes": args.world_sizes, "points_dir": os.path.relpath(points_dir, REPO_ROOT)}


def _notes(ok: list[dict[str, Any]], missing: list[str], config: dict[str, Any]) -> list[str]:
    """How to read the table, and what this run left out."""
    notes = [
        "Planned, not measured: leapalign.plan under FakeTensorMode (no GPU). peak_bytes is per GPU (per rank "
        "for FSDP2); fits: per memory size with 1 GiB of CUDA context and 95 % allocator share deducted.",
        "TFLOP/iter: one micro-batch (1 image) incl. the T-2 no-grad rollout steps, grad steps, backward, decode + "
        "reward; roofline s/iter: max(FLOPs / dense bf16 peak, weight traffic / bandwidth) on an H100 SXM "
        "(roofline_s in the JSON has every GPU of leapalign.training.gpus).",
        "plan s / plan RSS: wall time and peak RSS of the planning process on this machine (shared, 2 cores).",
        "FSDP2 ranks for 80 GB (full fine-tune only): smallest of --world-sizes whose per-rank peak fits; sizes whose "
        "sharded state alone exceeds 80 GB are not planned (fsdp_search in the JSON).",
    ]
    late = [r for r in ok if r.get("peak_phase") in ("optimizer", "ema")]
    if late:
        notes.append(f"{len(late)} point(s) peak in the optimizer step / EMA update, after backward: what is held then "
                     "(weights, gradients, AdamW state, EMA, the step's temporaries) is more than backward's peak.")
    if any(r["method"].startswith("bptt") for r in ok):
        notes.append("bptt / bptt_ckpt (every step with grad) are planned at T = 3 and T = 4 and extrapolated linearly "
                     "to T (leapalign.training.plan.EXTRAPOLATE_FROM; exact against full traces: "
                     "tests/test_plan_extrapolation.py).")
    if missing:
        notes.append(f"Not planned in this run ({len(missing)} of {len(TRAIN_MODES) * len(RESOLUTIONS) * len(MATRIX_METHODS)} "
                     f"matrix points): {', '.join(missing)}. Each FLUX.1-dev point takes minutes on this shared "
                     f"2-core machine; rerun the command without --points/--methods/... to fill them in (finished "
                     f"points are kept in {config['points_dir']}/ and skipped).")
    return notes


def main(argv: Sequence[str] | None = None) -> int:
    args, argv = parse_suite_args(build_parser(), argv)
    kw = dict(steps=args.steps, lora_rank=args.lora_rank, gradient_checkpointing=args.gradient_checkpointing,
              model=args.model, reward=args.reward, mixed_precision=args.mixed_precision,
              trainable_dtype=args.trainable_dtype)
    if args.point is not None:
        method, res, mode, world = args.point
        record = plan_point(method, int(res), mode, int(world), **kw)
        print(_RECORD_MARK + json.dumps(record), flush=True)
        return 0
    if args.steps < 2:
        raise ValueError(f"--steps must be >= 2, got {args.steps}")
    default_name = "plan_flux_dev.json" if args.model == "flux-dev" else f"plan_{args.model}.json"
    json_path, md_path = output_paths(args, default_name)
    points_dir = os.path.splitext(json_path)[0] + "_points"

    def one(point: tuple[str, int, str]) -> dict[str, Any]:
        method, res, mode = point
        rec = _run_point(args, points_dir, method, res, mode, 1)
        if mode == "full" and args.world_search and rec["status"] == "ok":
            world_search(args, points_dir, rec)
        return rec

    def finished(rec: dict[str, Any]) -> bool:
        return rec["status"] != "not planned"

    if args.jobs > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(args.jobs) as pool:
            records = list(pool.map(one, _selected(args)))
    else:
        records = [one(p) for p in _selected(args)]
    records = [r for r in records if finished(r)]
    done = {(r["method"], r["resolution"], r["train_mode"]) for r in records if r["status"] == "ok"}
    missing = _missing(args, done) if args.model == "flux-dev" else []
    config = _suite_config(args, points_dir)
    ok = [r for r in records if r["status"] == "ok"]
    summary = {"points": len(records), "ok": len(ok), "matrix_points_missing": len(missing),
               "max_plan_seconds": max((r["plan_seconds"] for r in ok), default=None),
               "max_plan_rss_gib": round(max((r["rss_peak_bytes"] for r in ok), default=0) / GIB, 2)}
    doc = ResultDoc("plan", machine_info(["plan", *argv]), config, records, summary)
    notes = _notes(ok, missing, config)
    notes += args.note
    write_results(json_path, md_path, doc, COLUMNS, f"Planned FLUX.1-dev training memory and time ({args.model})", notes)
    png = plot_plan(records, os.path.splitext(json_path)[0] + ".png",
                    f"{args.model}: planned peak per GPU, T={args.steps}, batch 1, LoRA r{args.lora_rank} | "
                    f"{doc.machine.get('cpu')} | torch {doc.machine.get('torch')}")
    if png:
        print(f"wrote {png}")
    return 0 if all(r["status"] == "ok" for r in records) else 1
