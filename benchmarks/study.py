"""``python -m benchmarks study``: LeapAlign vs its baselines on the shapes world at equal training time.

Every run starts from the shipped shapes model and trains with :class:`leapalign.LeapAlignTrainer`
on the shipped learned scorer; only the objective changes (same T, batch, learning rate, hinge,
optimiser, prompts, seeds). It is judged on the fixed evaluation set (fixed noise) by the exact
rule-based evaluator, on the held-out prompt split, by the scorer and by the background-artifact
share (:mod:`leapalign.shapes.experiment`).

**Equal wall-clock without a clock in the result.** A budget measured with a clock makes the result
depend on how busy the machine was. Instead ``--calibrate`` measures once, on an idle machine and
under the study's own conditions (``--jobs`` runs side by side, one thread each), the seconds per
optimiser step of every configuration, and writes them to ``study_calibration.json``. A study then
gives each configuration ``budget / seconds_per_step`` steps, the budget being ``--leapalign-steps``
steps of the reference LeapAlign (default 240, the demo's). Runs are deterministic for their seed; the calibration file (with
its machine and load average) is copied into the study's JSON. Accuracy vs wall-clock uses the
calibrated seconds (step x seconds per step), evaluated at ``--checkpoints`` points of each run.

Groups of runs (each over ``--seeds``): ``methods`` (the reference -- LeapAlign at the demo's alpha and
leaps --, full_backprop, draft_lv, refl, drtune), ``alpha`` (0, 0.1, 0.3, 1 at the demo's leaps) and ``leaps``
(1, 2, 3 at the demo's alpha); shared points run once. Every other setting is the demo's
(:class:`~leapalign.shapes.experiment.DemoSettings`), training prompts, LeapAlign's leap range
(``max_leap_step``) and EMA included; the runs are judged by the weights the demo judges.

**Resumable and parallel.** Each run is written to ``STEM_runs/`` as soon as it finishes; a rerun
skips every run whose file matches its settings (a changed setting reruns it). Runs go to a pool of
``--jobs`` processes (default: the cores), one torch thread each. Then ``STEM.json`` (everything),
``STEM.md`` (mean +- std over seeds, paired comparisons against LeapAlign: a paired bootstrap over
prompts, :mod:`leapalign.shapes.stats`) and ``STEM.png`` (accuracy vs training wall-clock per run,
mean and min-max band over seeds).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

from benchmarks.machine import command_line, machine_info
from benchmarks.options import RESULTS_DIR, parse_suite_args, suite_parser
from benchmarks.study_report import GROUP_TITLES, markdown_report, plot
from benchmarks.study_report import reference_label as recorded_reference

__all__ = ["RunSpec", "reference_label", "study_runs", "run_one", "calibrate", "steps_for", "summarise", "comparisons",
           "build_parser", "main"]

DEFAULT_OUT = str(Path(RESULTS_DIR) / "study_shapes")
DEFAULT_CALIBRATION = str(Path(RESULTS_DIR) / "study_calibration.json")
METHODS: tuple[str, ...] = ("leapalign", "full_backprop", "draft_lv", "refl", "drtune")
ALPHAS: tuple[float, ...] = (0.0, 0.1, 0.3, 1.0)
LEAPS: tuple[int, ...] = (1, 2, 3)


class RunSpec(dict):
    """One configuration: ``label``, ``objective`` name, objective ``overrides``, the ``groups`` it belongs to."""

    @property
    def key(self) -> str:
        return self["label"]

    @property
    def cost_key(self) -> str:
        """What its seconds per step depend on: the objective and the number of leaps (alpha costs nothing)."""
        return f"{self['objective']} leaps={self['overrides']['num_leaps']}" if self["objective"] == "leapalign" else self["objective"]


def reference_label(settings: Any) -> str:
    """The run every other is compared with and whose step sets the time budget: LeapAlign at the demo's settings."""
    return f"leapalign a={settings.alpha:g} leaps={settings.num_leaps}"


def study_runs(groups: Sequence[str], settings: Any = None) -> list[RunSpec]:
    """The distinct configurations the requested ``groups`` need (shared points run once); the sweeps vary alpha or
    the number of leaps around the demo's LeapAlign (``settings``, default :class:`DemoSettings`)."""
    from leapalign.shapes.experiment import DemoSettings

    settings = settings if settings is not None else DemoSettings()
    runs: dict[str, RunSpec] = {}

    def add(label: str, objective: str, overrides: dict[str, Any], group: str) -> None:
        spec = runs.setdefault(label, RunSpec(label=label, objective=objective, overrides=overrides, groups=[]))
        spec["groups"].append(group)

    def leapalign(alpha: float, leaps: int, group: str) -> None:
        add(f"leapalign a={alpha:g} leaps={leaps}", "leapalign", {"alpha": alpha, "num_leaps": leaps}, group)

    for g in groups:
        if g == "methods":
            for m in METHODS:
                if m == "leapalign":
                    leapalign(settings.alpha, settings.num_leaps, g)
                else:
                    add(m, m, {}, g)
        elif g == "alpha":
            for a in sorted({*ALPHAS, settings.alpha}):
                leapalign(a, settings.num_leaps, g)
        elif g == "leaps":
            for n in sorted({*LEAPS, settings.num_leaps}):
                leapalign(settings.alpha, n, g)
        else:
            raise ValueError(f"unknown study group {g!r}; expected methods, alpha or leaps")
    return list(runs.values())


def _spec_settings(spec: RunSpec, settings: Any, seed: int, steps: int) -> Any:
    return replace(settings, seed=seed, train_steps=max(1, steps), eval_every=10**9, **spec["overrides"])  # alpha, num_leaps


def _evaluated_weights(trainer: Any) -> Any:
    """The weights a run is judged by, as the demo does: the EMA swapped in when the trainer keeps one."""
    ema = getattr(trainer, "ema", None)
    return ema.swapped_in() if ema is not None else contextlib.nullcontext()


def run_one(spec: RunSpec, seed: int, settings: Any, steps: int, scorer: Any, base_model: Any, checkpoints: int = 4,
            seconds_per_step: float = 1.0) -> dict[str, Any]:
    """Train a fresh copy of ``base_model`` with ``spec`` for exactly ``steps`` steps; evaluate at ``checkpoints``
    evenly spaced steps (eval set) and at the end (eval and held-out sets, per-prompt verdicts kept)."""
    import copy
    import tempfile

    from leapalign.shapes.experiment import eval_sets, evaluate_alignment, make_trainer, objective_kwargs

    s = _spec_settings(spec, settings, seed, steps)
    sets = eval_sets(s)
    noise = {"eval": s.eval_seed, "heldout": s.heldout_seed}
    model = copy.deepcopy(base_model)  # every run starts from the same weights, whatever happens on disk
    marks = sorted({max(1, round(steps * k / checkpoints)) for k in range(1, checkpoints + 1)}) if steps else []
    curve, metrics, train_seconds = [], [], 0.0
    with tempfile.TemporaryDirectory(prefix="leapalign_study_") as tmp:
        trainer = make_trainer(model, scorer, s, tmp, spec["objective"], objective_kwargs(s, spec["objective"])) if steps else None
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            m = trainer.training_step()
            train_seconds += time.perf_counter() - t0
            metrics.append(float(m.get("reward_mean", float("nan"))))
            if step in marks and step != steps:
                with _evaluated_weights(trainer):
                    res = evaluate_alignment(model, scorer, sets["eval"], s.num_steps, s.eval_seed)
                curve.append({"step": step, "accuracy": res.accuracy["overall"], "reward": res.reward})
    with _evaluated_weights(trainer):
        final = {name: evaluate_alignment(model, scorer, specs, s.num_steps, noise[name]) for name, specs in sets.items()}
    curve.append({"step": steps, "accuracy": final["eval"].accuracy["overall"], "reward": final["eval"].reward})
    for point in curve:
        point["calibrated_seconds"] = point["step"] * seconds_per_step
    return {
        "label": spec["label"], "objective": spec["objective"], "overrides": spec["overrides"], "seed": seed, "steps": steps,
        "measured_train_seconds": round(train_seconds, 2),  # on whatever load there was; the comparison uses calibrated time
        "train_reward_last": statistics.fmean(metrics[-5:]) if metrics else None,
        **final["eval"].to_json(),  # per-prompt verdicts ("correct") included: the paired comparisons read them
        **({"heldout": final["heldout"].to_json()} if "heldout" in final else {}),
        "curve": curve,
    }


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


_WORKER: dict[str, Any] = {}


def _worker_job(job: dict[str, Any]) -> dict[str, Any]:
    """Run one job in a worker: a study run, or (``calibrate``) a timing of a few steps of one configuration."""
    from leapalign.shapes.experiment import DemoSettings
    from leapalign.shapes.model import load_shapes_model
    from leapalign.shapes.scorer import load_shapes_scorer

    key = (job["model"], job["scorer"])
    if _WORKER.get("key") != key:  # each worker loads the assets once
        _WORKER.update(key=key, model=load_shapes_model(job["model"] and Path(job["model"])),
                       scorer=load_shapes_scorer(job["scorer"] and Path(job["scorer"])))
    settings = DemoSettings(**job["settings"])
    spec = RunSpec(job["spec"])
    if job.get("calibrate"):
        return _time_steps(spec, settings, _WORKER["model"], _WORKER["scorer"], job["calibrate"])
    return run_one(spec, job["seed"], settings, job["steps"], _WORKER["scorer"], _WORKER["model"], job["checkpoints"],
                   job["seconds_per_step"])


def _time_steps(spec: RunSpec, settings: Any, base_model: Any, scorer: Any, steps: int, warmup: int = 2) -> dict[str, Any]:
    import copy
    import tempfile

    from leapalign.shapes.experiment import make_trainer, objective_kwargs

    s = _spec_settings(spec, settings, 0, warmup + steps)
    with tempfile.TemporaryDirectory(prefix="leapalign_calib_") as tmp:
        trainer = make_trainer(copy.deepcopy(base_model), scorer, s, tmp, spec["objective"], objective_kwargs(s, spec["objective"]))
        times = []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            trainer.training_step()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return {"cost_key": spec.cost_key, "seconds_per_step": statistics.median(times), "seconds_all": [round(t, 3) for t in times]}


def _run_jobs(jobs: list[dict[str, Any]], n_workers: int, on_result) -> None:
    """Run ``jobs`` (in this process when ``n_workers`` is 1, else in a spawned pool) calling ``on_result`` as each ends."""
    if n_workers <= 1:
        for job in jobs:
            on_result(job, _worker_job(job))
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # Inherited by the spawned workers before they import torch: one OpenMP thread, sleeping when idle.
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    with ProcessPoolExecutor(max_workers=n_workers, mp_context=mp.get_context("spawn"), initializer=_init_worker) as pool:
        futures = {pool.submit(_worker_job, job): job for job in jobs}
        for fut in as_completed(futures):
            on_result(futures[fut], fut.result())


def calibrate(specs: Sequence[RunSpec], settings: Any, jobs: int, steps: int, model: str | None, scorer: str | None) -> dict[str, Any]:
    """Seconds per optimiser step of each cost class of ``specs``, ``jobs`` timings side by side, one thread each."""
    by_cost = {s.cost_key: s for s in specs}
    job_list = [{"spec": dict(s), "settings": asdict(settings), "calibrate": steps, "model": model, "scorer": scorer} for s in by_cost.values()]
    # Keep the pool as busy as the study will be: repeat the list so every worker always has a timing to do.
    result: dict[str, list[float]] = {}
    _run_jobs(job_list * max(1, jobs), jobs, lambda job, r: result.setdefault(r["cost_key"], []).append(r["seconds_per_step"]))
    return {k: statistics.median(v) for k, v in result.items()}


def reference_cost_key(settings: Any) -> str:
    """The calibration entry of the reference LeapAlign (:func:`reference_label`)."""
    return f"leapalign leaps={settings.num_leaps}"


def steps_for(spec: RunSpec, seconds_per_step: dict[str, float], leapalign_steps: int, reference_cost: str) -> int:
    """Steps that give ``spec`` the training time of ``leapalign_steps`` steps of the reference LeapAlign."""
    budget = leapalign_steps * seconds_per_step[reference_cost]
    return max(1, round(budget / seconds_per_step[spec.cost_key]))


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per label: mean and std over seeds (:func:`leapalign.shapes.stats.summarise_runs`)."""
    from leapalign.shapes.stats import summarise_runs

    return summarise_runs(runs)


def comparisons(runs: Sequence[dict[str, Any]], specs: Sequence[dict[str, Any]], reference: str,
                resamples: int = 10_000) -> dict[str, dict[str, Any]]:
    """Every label against ``reference`` (:func:`leapalign.shapes.stats.compare_with`: paired bootstrap over prompts)."""
    from leapalign.shapes.stats import compare_with

    return compare_with(reference, runs, [sp["label"] for sp in specs], resamples)


def build_parser() -> argparse.ArgumentParser:
    from leapalign.shapes.world import CATEGORIES

    p = suite_parser("study", __doc__, threads=False)
    p.add_argument("--calibrate", action="store_true", help="measure seconds per step of every configuration (idle machine!) and write --calibration")
    p.add_argument("--calibration", default=DEFAULT_CALIBRATION, help="calibration file (default benchmarks/results/study_calibration.json)")
    p.add_argument("--calibration-steps", type=int, default=8, help="timed steps per configuration when calibrating (after 2 warm-up)")
    p.add_argument("--leapalign-steps", type=int, default=240, help="the training budget: this many LeapAlign steps' worth of time per run (the demo's 240)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    p.add_argument("--groups", nargs="+", default=list(GROUP_TITLES), help="methods, alpha, leaps")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs side by side, one thread each (default: the cores)")
    p.add_argument("--checkpoints", type=int, default=4, help="evaluations per run along training (the last at the end)")
    p.add_argument("--T", dest="num_steps", type=int, default=None, help="Euler steps of rollout and eval sampler (demo default)")
    p.add_argument("--batch-size", type=int, default=None, help="prompts per step (demo default)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (demo default)")
    p.add_argument("--leaps", type=int, default=None, help="leaps of the reference LeapAlign, whose step is the budget (demo default)")
    p.add_argument("--colour-diversity", type=float, default=None, help="weight of the training reward's colour prior (demo default)")
    p.add_argument("--eval-prompts", type=int, default=None, help="size of the fixed eval set (demo default, 576)")
    p.add_argument("--heldout-prompts", type=int, default=96, help="size of the held-out eval set (0: skip)")
    p.add_argument("--train-categories", nargs="+", choices=(*CATEGORIES, "all"), default=None, metavar="CATEGORY",
                   help="training prompts of these categories only, 'all' for the whole grammar (demo default)")
    p.add_argument("--model", default=None, help="shapes model checkpoint (default: shipped)")
    p.add_argument("--scorer", default=None, help="scorer checkpoint (default: shipped)")
    p.add_argument("--out", default=DEFAULT_OUT, help="output path stem: STEM.json/.md/.png and STEM_runs/ (default benchmarks/results/study_shapes)")
    p.add_argument("--reading", type=Path, default=None, help="a text file with the written reading to embed in the Markdown (default: STEM_reading.md when present)")
    p.add_argument("--render-only", action="store_true", help="run nothing: re-render STEM.md/.png from STEM.json (with --reading)")
    return p


def _settings(args: argparse.Namespace) -> Any:
    from leapalign.shapes.experiment import DemoSettings, train_categories_arg

    base = DemoSettings()
    given = {"eval_prompts": args.eval_prompts, "num_steps": args.num_steps, "batch_size": args.batch_size, "learning_rate": args.lr, "num_leaps": args.leaps,
             "colour_diversity": args.colour_diversity}
    # an explicit value (0 included) always reaches DemoSettings, which rejects a bad one by name
    given = {k: v for k, v in given.items() if v is not None}
    if args.train_categories is not None:  # 'all' (None) is a value here, not "not given"
        given["train_categories"] = train_categories_arg(args.train_categories)
    return replace(base, heldout_prompts=args.heldout_prompts, **given)


def _slug(label: str, seed: int) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in label) + f"__seed{seed}.json"


def _calibrate_main(args: argparse.Namespace, settings: Any, specs: list[RunSpec], command: str, argv: list[str]) -> int:
    t0 = time.perf_counter()
    sps = calibrate(specs, settings, args.jobs, args.calibration_steps, args.model, args.scorer)
    cal = {"command": command, "machine": machine_info(["study", *argv]), "jobs": args.jobs, "settings": asdict(settings),
           "seconds_per_step": sps, "wall_seconds": time.perf_counter() - t0}
    Path(args.calibration).parent.mkdir(parents=True, exist_ok=True)
    Path(args.calibration).write_text(json.dumps(cal, indent=2) + "\n")
    print(f"[study] calibration ({args.jobs} side by side, load average {cal['machine']['load_average_1_5_15']}): "
          + ", ".join(f"{k} {v:.3f} s/step" for k, v in sps.items()) + f" -> {args.calibration}")
    return 0


def _asset_digests(model: str | None, scorer: str | None) -> dict[str, str]:
    """SHA-256 of the weights of the model and scorer the runs use (the shipped ones when None)."""
    import hashlib

    from leapalign.shapes.model import shapes_model_files
    from leapalign.shapes.scorer import shapes_scorer_files

    files = {"model": shapes_model_files(model)[0], "scorer": shapes_scorer_files(scorer)[0]}
    return {k: hashlib.sha256(f.read_bytes()).hexdigest() for k, f in files.items()}


def _plan(args: argparse.Namespace, settings: Any, specs: list[RunSpec], sps: dict[str, float], runs_dir: Path
          ) -> tuple[list[dict[str, Any]], dict[tuple[str, int], dict[str, Any]]]:
    """``(todo, done)``: the jobs still to run and the results already saved (same settings) in ``runs_dir``."""
    common = {"settings": asdict(settings), "checkpoints": args.checkpoints, "model": args.model, "scorer": args.scorer}
    assets = _asset_digests(args.model, args.scorer)  # a retrained shipped asset invalidates the runs made with the old one
    todo, done = [], {}
    for spec in [RunSpec(label="shipped model", objective="none", overrides={}, groups=[])] + specs:
        for seed in ([0] if spec["objective"] == "none" else args.seeds):
            steps = 0 if spec["objective"] == "none" else steps_for(spec, sps, args.leapalign_steps, reference_cost_key(settings))
            job = {"spec": dict(spec), "seed": seed, "steps": steps, "seconds_per_step": 0.0 if not steps else sps[spec.cost_key], **common}
            path = runs_dir / _slug(spec["label"], seed)
            fingerprint = {k: job[k] for k in ("spec", "seed", "steps", "seconds_per_step", "settings", "checkpoints", "model", "scorer")}
            fingerprint["spec"] = {k: v for k, v in job["spec"].items() if k != "groups"}
            fingerprint["assets"] = assets
            fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back from the file (tuples become lists)
            if path.is_file() and json.loads(path.read_text()).get("job") == fingerprint:
                done[(spec["label"], seed)] = json.loads(path.read_text())["result"]
            else:
                todo.append(job | {"path": str(path), "fingerprint": fingerprint})
    return todo, done


def _render_only(out: Path, reading: Path | None) -> int:
    """``--render-only``: recompute the derived summary and comparisons, re-render STEM.md/.png from STEM.json."""
    data = json.loads(out.with_suffix(".json").read_text())
    data["summary"], data["comparisons"] = summarise(data["runs"]), comparisons(data["runs"], data["specs"], recorded_reference(data))
    if reading:
        data["reading"] = reading.read_text().strip()
    out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown_report(data))
    plot(data, out.with_suffix(".png"))
    print(f"[study] re-rendered {out}.md/.png from {out}.json")
    return 0


def _parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str], Path]:
    """Parsed arguments, checked before any run starts (a bad --reading must not surface after an hour of runs)."""
    parser = build_parser()
    args, argv = parse_suite_args(parser, argv)
    out = Path(args.out)
    if args.reading is None and Path(f"{out}_reading.md").is_file():
        args.reading = Path(f"{out}_reading.md")  # the committed reading survives a rerun
    if args.reading is not None and not args.reading.is_file():
        parser.error(f"--reading {args.reading}: no such file")
    if args.render_only and not out.with_suffix(".json").is_file():
        parser.error(f"--render-only: no study at {out.with_suffix('.json')} (run the study first, or pass its --out)")
    for flag, value in (("--leapalign-steps", args.leapalign_steps), ("--jobs", args.jobs), ("--checkpoints", args.checkpoints)):
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    return args, argv, out


def main(argv: Sequence[str] | None = None) -> int:
    args, argv, out = _parse(argv)
    if args.render_only:
        return _render_only(out, args.reading)
    try:
        settings = _settings(args)
    except ValueError as e:  # DemoSettings names the bad value
        build_parser().error(str(e))
    specs = study_runs(args.groups, settings)
    command = command_line(["study", *argv])
    if args.calibrate:
        return _calibrate_main(args, settings, specs, command, argv)
    cal_path = Path(args.calibration)
    if not cal_path.is_file():
        print(f"python -m benchmarks study: error: no calibration at {cal_path}; run with --calibrate first (on an idle machine)", file=sys.stderr)
        return 2
    cal = json.loads(cal_path.read_text())
    sps = cal["seconds_per_step"]
    missing = sorted({s.cost_key for s in specs} - set(sps))
    if missing:
        print(f"python -m benchmarks study: error: {cal_path} has no timing for {missing}; rerun --calibrate", file=sys.stderr)
        return 2

    runs_dir = Path(f"{out}_runs")
    runs_dir.mkdir(parents=True, exist_ok=True)
    todo, done = _plan(args, settings, specs, sps, runs_dir)
    print(f"[study] {len(done)} runs already done in {runs_dir}, {len(todo)} to run on {args.jobs} worker(s)", flush=True)
    t0 = time.perf_counter()
    total = len(done) + len(todo)

    def save(job: dict[str, Any], result: dict[str, Any]) -> None:
        Path(job["path"]).write_text(json.dumps({"job": job["fingerprint"], "result": result}, indent=2) + "\n")
        done[(result["label"], result["seed"])] = result
        print(f"[study {len(done)}/{total} {time.perf_counter() - t0:.0f}s] {result['label']} seed {result['seed']}: {result['steps']} steps, "
              f"accuracy {100 * result['accuracy']['overall']:.1f}%, reward {result['reward']:.3f}", flush=True)

    _run_jobs(todo, args.jobs, save)
    baseline = done.pop(("shipped model", 0))
    runs = [done[(s["label"], seed)] for seed in args.seeds for s in specs]
    data: dict[str, Any] = {
        "command": command, "machine": machine_info(["study", *argv]), "jobs": args.jobs, "settings": asdict(settings),
        "seeds": list(args.seeds), "specs": [dict(s) for s in specs], "calibration": cal, "leapalign_steps": args.leapalign_steps,
        "reference": reference_label(settings), "budget_seconds": args.leapalign_steps * sps[reference_cost_key(settings)],
        "baseline": baseline, "runs": runs, "summary": summarise(runs), "comparisons": comparisons(runs, specs, reference_label(settings)),
        "reading": args.reading.read_text().strip() if args.reading else "", "wall_seconds_this_invocation": time.perf_counter() - t0,
    }
    out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown_report(data))
    plot(data, out.with_suffix(".png"))
    print(f"[study] wrote {out}.json/.md/.png ({len(todo)} runs in {data['wall_seconds_this_invocation']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
