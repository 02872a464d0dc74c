"""``leapalign demo``, its library (``leapalign.shapes.experiment``) and ``python -m benchmarks study`` on the
shipped shapes-world assets, tiny budgets.

The demo test is the CI guarantee behind ``make demo``: the quick run goes end to end through the
real trainer and writes every output with sane contents. The study test runs one point of the
equal-wall-clock study and renders its report. Timings are never asserted.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from leapalign.shapes import demo, experiment
from leapalign.shapes.world import CATEGORIES, eval_prompts

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    return path.is_file() and path.stat().st_size > 100 and path.read_bytes()[:8] == PNG_MAGIC


def test_demo_quick_runs_end_to_end_and_writes_every_output(tmp_path):
    out = tmp_path / "demo_out"
    assert demo.main(["--quick", "--out", str(out), "--no-progress", "--threads", "1"]) == 0

    for name in ("before_after.png", "curves.png"):
        assert _is_png(out / name), name
    summary = json.loads((out / "summary.json").read_text())
    quick = experiment.quick_settings()
    assert summary["command"].startswith("leapalign demo --quick")
    assert summary["seeds"] == [0] and summary["threads"]["threads"] == 1
    assert set(summary["eval_sets"]) == {"eval", "heldout"}
    (run,) = summary["runs"]
    assert run["train_steps_done"] == quick.train_steps
    for when in (summary["before"], run["after"]):
        for name, n in (("eval", quick.eval_prompts), ("heldout", quick.heldout_prompts)):
            acc = when[name]["accuracy"]
            assert set(acc) == set(CATEGORIES) | {"overall"}  # the quick eval sets hold one prompt per category
            assert all(0.0 <= v <= 1.0 for v in acc.values())
            assert 0.0 < when[name]["reward"] < 1.0
            assert 0.0 <= when[name]["background_artifact_share"] <= 1.0
            verdicts = when[name]["correct"]  # one 0/1 per prompt, in eval-set order; they make up the accuracy
            assert len(verdicts) == n and set(verdicts) <= {"0", "1"} and math.isclose(verdicts.count("1") / n, acc["overall"])
    gain = 100 * (run["after"]["eval"]["accuracy"]["overall"] - summary["before"]["eval"]["accuracy"]["overall"])
    assert math.isclose(run["accuracy_gain_points"], gain)
    assert summary["gain_points_by_seed"] == {"0": run["accuracy_gain_points"]}
    assert summary["mean_gain_points"] == summary["min_gain_points"] == run["accuracy_gain_points"]
    assert summary["heldout"]["gain_points_by_seed"] == {"0": run["heldout_gain_points"]}
    assert summary["background_artifact_share"]["after_by_seed"]["0"] == run["after"]["eval"]["background_artifact_share"]
    # --quick trains 2 steps: no verdict on the 15-point target (nor on hacking) is printed or stored.
    assert summary["target_judged"] is False
    assert "not judged" in summary["reading"] and "not judged" in run["reading"] and "NOT reached" not in summary["reading"]
    assert run["evals"] and run["evals"][-1]["step"] == quick.train_steps
    assert len(run["train_metrics"]) == quick.train_steps
    assert all(math.isfinite(m["loss"]) for m in run["train_metrics"])

    table = json.loads((out / "memory_time.json").read_text())
    rows = {r["method"]: r for r in table["rows"]}
    assert set(rows) == {"leapalign", "full_backprop"}
    assert all(r["T"] == quick.num_steps and r["batch_size"] == quick.batch_size for r in rows.values())
    # LeapAlign keeps two forwards' activations, full BPTT all T of them: it must save less.
    assert 0 < rows["leapalign"]["saved_bytes"] < rows["full_backprop"]["saved_bytes"]
    md = (out / "memory_time.md").read_text()
    assert "| leapalign |" in md and "| full_backprop |" in md and table["command"] in md


def _numbers(run: dict) -> dict:
    """What a demo run reports, without its timings."""
    return {"after": run["after"], "gain": run["accuracy_gain_points"], "evals": [{k: v for k, v in e.items() if k != "train_seconds"} for e in run["evals"]],
            "metrics": [{k: v for k, v in m.items() if k != "seconds"} for m in run["train_metrics"]]}


def test_demo_numbers_depend_only_on_the_seed(tmp_path):
    """Same seed (and thread count) -> bit-identical numbers, whatever ran before it in the process and
    however long the steps took; another seed -> other numbers. Per-seed and mean gains are reported."""
    args = ["--quick", "--no-progress", "--threads", "1", "--steps", "3"]
    assert demo.main([*args, "--seeds", "0", "1", "--out", str(tmp_path / "a")]) == 0
    assert demo.main([*args, "--seeds", "1", "--out", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "summary.json").read_text())
    b = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert a["before"] == b["before"]
    assert _numbers(a["runs"][1]) == _numbers(b["runs"][0])
    assert _numbers(a["runs"][0])["metrics"] != _numbers(a["runs"][1])["metrics"]
    assert set(a["gain_points_by_seed"]) == {"0", "1"}
    gains = list(a["gain_points_by_seed"].values())
    assert math.isclose(a["mean_gain_points"], sum(gains) / 2) and a["min_gain_points"] == min(gains)


def test_a_time_limit_aborts_instead_of_reporting_a_truncated_run(tmp_path, capsys):
    out = tmp_path / "demo_out"
    code = demo.main(["--quick", "--no-progress", "--threads", "1", "--steps", "3", "--time-limit", "1e-9", "--out", str(out)])
    assert code == 1
    assert "time limit" in capsys.readouterr().err
    assert not (out / "summary.json").exists()


def test_demo_help_states_each_default_once():
    text = demo.build_parser().format_help()
    for block in text.split("\n  --")[1:]:
        assert block.count("default") <= 1, block  # ArgumentDefaultsHelpFormatter appended a second one


def test_pretrain_toy_usage_names_the_command(capsys):
    from leapalign.shapes import pretrain

    assert pretrain.build_parser().prog == "leapalign pretrain-toy"
    with pytest.raises(SystemExit):
        pretrain.main(["--help"])
    assert capsys.readouterr().out.startswith("usage: leapalign pretrain-toy")
    assert pretrain.build_parser("python -m leapalign.shapes.pretrain").prog == "python -m leapalign.shapes.pretrain"


def test_a_larger_eval_set_starts_with_the_smaller_one():
    """The demo's 576-prompt set begins with the 192-prompt one, with the same noise: its first verdicts are
    the smaller set's, so the two figures can be compared on the same runs (the docs rely on it)."""
    from leapalign.shapes.model import load_shapes_model
    from leapalign.shapes.scorer import load_shapes_scorer

    model, scorer = load_shapes_model(), load_shapes_scorer()
    assert eval_prompts(576, 1234)[:192] == eval_prompts(192, 1234)
    small = experiment.evaluate_alignment(model, scorer, eval_prompts(50, 7), num_steps=2, seed=3, batch_size=25)
    large = experiment.evaluate_alignment(model, scorer, eval_prompts(100, 7), num_steps=2, seed=3, batch_size=25)
    assert torch.equal(large.images[:50], small.images) and large.correct[:50] == small.correct


def test_eval_is_deterministic_and_sees_training(tmp_path):
    """Same prompts + seed -> same images (before/after are comparable); a training step changes them."""
    from leapalign.shapes.model import load_shapes_model
    from leapalign.shapes.scorer import load_shapes_scorer

    model, scorer = load_shapes_model(), load_shapes_scorer()
    specs = eval_prompts(3, seed=5)
    a = experiment.evaluate_alignment(model, scorer, specs, num_steps=2, seed=11)
    b = experiment.evaluate_alignment(model, scorer, specs, num_steps=2, seed=11)
    assert torch.equal(a.images, b.images) and a.reward == b.reward
    settings = replace(experiment.quick_settings(), train_steps=1, learning_rate=1e-2)
    trainer = experiment.make_trainer(model, scorer, settings, tmp_path)
    log = experiment.train_and_track(trainer, settings, lambda: experiment.evaluate_alignment(model, scorer, specs, 2, 11), show_progress=False)
    assert len(log.steps) == 1 and log.last_eval is not None
    assert not torch.equal(log.last_eval.images, a.images)


def test_reading_calls_out_a_hacked_scorer():
    def res(acc: float, reward: float) -> experiment.EvalResult:
        return experiment.EvalResult({"overall": acc}, reward, {}, torch.zeros(1, 3, 2, 2))

    assert "hacked" in experiment.reading(res(0.10, 0.30), res(0.10, 0.60))
    assert "reached" in experiment.reading(res(0.10, 0.30), res(0.30, 0.60)) and "NOT" not in experiment.reading(res(0.10, 0.30), res(0.30, 0.60))
    assert "NOT reached" in experiment.reading(res(0.10, 0.30), res(0.15, 0.31))
    assert "not judged" in experiment.reading(res(0.10, 0.30), res(0.10, 0.60), judge_target=False)


def test_seeds_reading_judges_mean_and_min_over_three_seeds():
    ok = experiment.gain_summary({0: 16.0, 1: 15.0, 2: 14.5})
    assert ok["mean_gain_points"] == pytest.approx(15.1666, abs=1e-3) and ok["min_gain_points"] == 14.5
    assert "target" in experiment.seeds_reading(ok) and "NOT" not in experiment.seeds_reading(ok)
    low = experiment.gain_summary({0: 30.0, 1: 20.0, 2: 9.0})  # mean 19.7 but one seed below +10
    assert "NOT reached" in experiment.seeds_reading(low)
    assert "judged over >= 3 seeds" in experiment.seeds_reading(experiment.gain_summary({0: 20.0}))
    assert "not judged" in experiment.seeds_reading(ok, judge_target=False)
    short = experiment.seeds_reading(experiment.gain_summary({0: 13.54, 1: 16.84, 2: 14.58}))  # mean 14.987
    assert "mean +14.99" in short and "NOT reached" in short  # not "+15.0 ... NOT reached"
    assert "mean +16.5" in experiment.seeds_reading(experiment.gain_summary({0: 16.0, 1: 17.0, 2: 16.5}))


def test_study_runs_share_points():
    from benchmarks import study

    settings = experiment.DemoSettings()
    specs = study.study_runs(["methods", "alpha", "leaps"])
    labels = [s["label"] for s in specs]
    assert len(labels) == len(set(labels)) == len(study.METHODS) + len(study.ALPHAS) - 1 + len(study.LEAPS) - 1
    reference = study.reference_label(settings)
    assert reference == f"leapalign a={settings.alpha:g} leaps={settings.num_leaps}"
    shared = next(s for s in specs if s["label"] == reference)
    assert shared["groups"] == ["methods", "alpha", "leaps"]
    assert shared["overrides"] == {"alpha": settings.alpha, "num_leaps": settings.num_leaps}
    # alpha changes no cost: one calibration per objective (and per number of leaps)
    assert {s.cost_key for s in specs} == {"leapalign leaps=1", "leapalign leaps=2", "leapalign leaps=3", *study.METHODS[1:]}
    sps = {"leapalign leaps=2": 1.0, "leapalign leaps=3": 2.0, "refl": 0.25}
    refl = study.RunSpec(label="refl", objective="refl", overrides={}, groups=[])
    assert study.steps_for(refl, sps, 200, "leapalign leaps=2") == 800 and study.steps_for(refl, sps, 200, "leapalign leaps=3") == 1600
    # The sweeps sit around the demo's LeapAlign, whatever it is: alpha at its leaps, leaps at its alpha.
    other = replace(settings, alpha=0.5, num_leaps=3)
    other_labels = [s["label"] for s in study.study_runs(["alpha", "leaps"], other)]
    assert "leapalign a=0.5 leaps=3" in other_labels and "leapalign a=0 leaps=3" in other_labels
    assert "leapalign a=0.5 leaps=1" in other_labels and not any(lab.endswith("leaps=2") and "a=0.3" in lab for lab in other_labels)


def test_study_defaults_are_the_demos_and_a_bad_setting_is_a_usage_error(capsys):
    """A plain ``python -m benchmarks study`` reproduces the committed study: the demo's eval set and budget."""
    from benchmarks import study

    args = study.build_parser().parse_args([])
    defaults = experiment.DemoSettings()
    assert study._settings(args).eval_prompts == defaults.eval_prompts and args.leapalign_steps == defaults.train_steps
    assert study._settings(args).train_categories == defaults.train_categories
    assert study._settings(study.build_parser().parse_args(["--train-categories", "all"])).train_categories is None
    assert study._settings(args).num_leaps == defaults.num_leaps
    assert study._settings(study.build_parser().parse_args(["--leaps", "2"])).num_leaps == 2
    assert study._settings(args).colour_diversity == defaults.colour_diversity
    assert study._settings(study.build_parser().parse_args(["--colour-diversity", "0"])).colour_diversity == 0.0
    bad = {  # each is refused before any run starts, naming what is wrong
        ("--eval-prompts", "0"): "eval_prompts=0 is invalid",
        ("--T", "0"): "num_steps=0 is invalid",  # an explicit 0 is not replaced by the default
        ("--lr", "0"): "learning_rate=0.0 is invalid",
        ("--jobs", "0"): "--jobs must be >= 1, got 0",
        ("--leapalign-steps", "-5"): "--leapalign-steps must be >= 1, got -5",
        ("--reading", "/nonexistent/reading.md"): "--reading /nonexistent/reading.md: no such file",
        ("--render-only",): "--render-only: no study at /nonexistent/study.json",
        ("--leaps", "4"): "num_leaps=4 is invalid",
        ("--colour-diversity", "-0.5"): "colour_diversity=-0.5 is invalid",
        ("--train-categories", "landscapes"): "invalid choice: 'landscapes'",
        ("--train-categories", "all", "colors"): "'all' is the whole grammar",
    }
    for flags, message in bad.items():
        with pytest.raises(SystemExit) as exit_info:
            study.main([*flags, "--out", "/nonexistent/study"])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, flags


_TINY = ["--T", "3", "--batch-size", "2", "--eval-prompts", "6", "--heldout-prompts", "6", "--groups", "leaps"]


def test_study_is_step_budgeted_resumable_and_compares_pairs(tmp_path, capsys):
    from benchmarks import study

    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps({"command": "test", "machine": {"load_average_1_5_15": [0, 0, 0]},
                               "seconds_per_step": {"leapalign leaps=1": 0.5, "leapalign leaps=2": 1.0, "leapalign leaps=3": 2.0}}))
    stem = tmp_path / "study"
    # The reference is the demo's LeapAlign (3 leaps, 2.0 s/step): 1 of its steps is the budget.
    assert study.reference_label(experiment.DemoSettings()) == "leapalign a=0.3 leaps=3"
    argv = [*_TINY, "--seeds", "0", "1", "--leapalign-steps", "1", "--checkpoints", "2", "--jobs", "1", "--calibration", str(cal), "--out", str(stem)]
    assert study.main(argv) == 0
    data = json.loads(stem.with_suffix(".json").read_text())
    steps = {(r["label"], r["seed"]): r["steps"] for r in data["runs"]}
    assert steps == {(f"leapalign a=0.3 leaps={n}", s): {1: 4, 2: 2, 3: 1}[n] for n in (1, 2, 3) for s in (0, 1)}  # equal calibrated time
    run = next(r for r in data["runs"] if r["label"] == "leapalign a=0.3 leaps=1")
    assert [p["step"] for p in run["curve"]] == [2, 4] and run["curve"][-1]["calibrated_seconds"] == 2.0
    assert len(run["correct"]) == 6 and len(run["heldout"]["correct"]) == 6 and "background_artifact_share" in run
    assert data["baseline"]["steps"] == 0
    assert data["reference"] == "leapalign a=0.3 leaps=3" and "leapalign a=0.3 leaps=3" not in data["comparisons"]
    cmp = data["comparisons"]["leapalign a=0.3 leaps=2"]
    assert cmp["seeds"] == [0, 1] and 0 < cmp["p_value"] <= 1 and cmp["ci_low"] <= cmp["diff_points"] <= cmp["ci_high"]
    md = stem.with_suffix(".md").read_text()
    assert "## LeapAlign number of leaps" in md and "paired bootstrap" in md and "held-out" in md
    assert "top colour (%)" in md and 0.2 <= data["summary"]["leapalign a=0.3 leaps=1"]["top_colour_share"][0] <= 1
    assert _is_png(stem.with_suffix(".png"))
    assert len(list((tmp_path / "study_runs").glob("*.json"))) == 7  # 6 runs + the untrained baseline

    # Resume: nothing reruns; a deleted run reruns alone and gives the same numbers (deterministic).
    capsys.readouterr()
    (tmp_path / "study_reading.md").write_text("LeapAlign reading, kept across reruns")  # STEM_reading.md: picked up
    assert study.main(argv) == 0
    assert "7 runs already done" in capsys.readouterr().out
    assert "LeapAlign reading, kept across reruns" in stem.with_suffix(".md").read_text()
    victim = tmp_path / "study_runs" / study._slug("leapalign a=0.3 leaps=2", 1)
    before = json.loads(victim.read_text())["result"]
    victim.unlink()
    assert study.main(argv) == 0
    assert "6 runs already done" in capsys.readouterr().out
    after = json.loads(victim.read_text())["result"]
    assert {k: v for k, v in after.items() if k != "measured_train_seconds"} == {k: v for k, v in before.items() if k != "measured_train_seconds"}


def test_study_reports_written_before_a_column_existed_still_render():
    """The committed whole-grammar study predates the recorded reference and the colour shares: it renders against
    the old reference without a colour column; the current study has both."""
    from benchmarks.study_report import markdown_report

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    old = markdown_report(json.loads((results / "study_shapes_whole_grammar.json").read_text()))
    assert "top colour" not in old and "Paired comparison with leapalign a=0.3 leaps=2" in old
    new = markdown_report(json.loads((results / "study_shapes.json").read_text()))
    assert "| top colour (%) |" in new and "Paired comparison with leapalign a=0.3 leaps=3" in new
    row = next(line for line in new.splitlines() if line.startswith("| shipped model"))
    assert row.count("|") == next(line for line in new.splitlines() if line.startswith("| run |")).count("|")


def test_study_reruns_runs_made_with_another_scorer(tmp_path):
    import argparse

    from benchmarks import study
    from leapalign.shapes.experiment import DemoSettings
    from leapalign.shapes.scorer import ShapesScorer, save_shapes_scorer

    specs = study.study_runs(["leaps"])
    sps = {"leapalign leaps=1": 0.5, "leapalign leaps=2": 1.0, "leapalign leaps=3": 2.0}
    args = argparse.Namespace(checkpoints=2, model=None, scorer=None, seeds=[0], leapalign_steps=2)
    todo, done = study._plan(args, DemoSettings(), specs, sps, tmp_path)
    assert not done and len(todo) == 4
    for job in todo:  # pretend every run finished with the shipped scorer
        Path(job["path"]).write_text(json.dumps({"job": job["fingerprint"], "result": {}}))
    assert len(study._plan(args, DemoSettings(), specs, sps, tmp_path)[1]) == 4
    # The same paths, another scorer behind them (a retrained shipped asset): every run is redone.
    other = save_shapes_scorer(ShapesScorer(), tmp_path / "other").parent
    assert study._asset_digests(None, str(other))["scorer"] != study._asset_digests(None, None)["scorer"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(study, "_asset_digests", lambda model, scorer: {"model": "m", "scorer": "retrained"})
        todo, done = study._plan(args, DemoSettings(), specs, sps, tmp_path)
    assert not done and len(todo) == 4


def test_study_calibrates_in_a_pool_of_single_thread_workers(tmp_path):
    from benchmarks import study

    cal = tmp_path / "cal.json"
    assert study.main([*_TINY, "--calibrate", "--calibration-steps", "1", "--jobs", "2", "--calibration", str(cal)]) == 0
    data = json.loads(cal.read_text())
    assert set(data["seconds_per_step"]) == {"leapalign leaps=1", "leapalign leaps=2", "leapalign leaps=3"}
    assert all(v > 0 for v in data["seconds_per_step"].values()) and data["jobs"] == 2
    assert study.main([*_TINY, "--calibration", str(tmp_path / "missing.json"), "--out", str(tmp_path / "s")]) == 2


def test_paired_bootstrap_finds_a_real_difference_and_not_a_fake_one():
    from leapalign.shapes.stats import paired_bootstrap

    g = torch.Generator().manual_seed(0)
    a = (torch.rand(3, 192, generator=g) < 0.3).tolist()
    same = paired_bootstrap(a, a)
    assert same.diff_points == 0 and same.p_value == 1.0 and same.ci_low == same.ci_high == 0
    better = [[x or (i % 4 == 0) for i, x in enumerate(row)] for row in a]  # b fixes a quarter of the prompts
    cmp = paired_bootstrap(a, better)
    assert cmp.diff_points > 10 and cmp.ci_low > 0 and cmp.p_value < 0.01 and "ahead of" in cmp.verdict("a", "b")
    assert cmp.p_value < 0.001 and "p < 0.001" in cmp.verdict("a", "b")  # never "p = 0.000"
    noisy = (torch.rand(3, 192, generator=g) < 0.3).tolist()  # an unrelated method of the same accuracy
    assert paired_bootstrap(a, noisy).p_value > 0.01
    with pytest.raises(ValueError, match="same non-empty shape"):
        paired_bootstrap(a, [row[:10] for row in a])


def test_log_score_reward_is_the_log_of_the_scorer_and_differentiable():
    from leapalign.rewards.base import call_reward
    from leapalign.shapes.scorer import load_shapes_scorer
    from leapalign.shapes.world import render_batch

    scorer = load_shapes_scorer()
    specs = eval_prompts(4, seed=2)
    images = render_batch(specs, seed=0).requires_grad_(True)
    prompts = [s.text for s in specs]
    log_r = call_reward(experiment.training_reward(scorer, "log_score"), images, prompts)
    torch.testing.assert_close(log_r, scorer(images, prompts).log(), rtol=1e-5, atol=1e-6)
    log_r.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert experiment.training_reward(scorer, "score") is scorer
    with pytest.raises(ValueError, match="reward must be one of"):
        experiment.training_reward(scorer, "logits")


def test_demo_settings_reject_a_bad_ema():
    with pytest.raises(ValueError, match="ema_decay"):
        experiment.DemoSettings(ema_decay=1.0)
    assert experiment.DemoSettings(ema_decay=0.97).ema_decay == 0.97


def test_demo_trains_on_its_training_categories_and_the_flag_picks_them(tmp_path):
    from leapalign.shapes.model import load_shapes_model
    from leapalign.shapes.scorer import load_shapes_scorer
    from leapalign.shapes.world import parse_prompt

    settings = experiment.quick_settings()
    assert settings.train_categories == experiment.DemoSettings().train_categories == ("single_object", "colors")
    trainer = experiment.make_trainer(load_shapes_model(), load_shapes_scorer(), settings, tmp_path)
    prompts = list(trainer.prompt_source.prompts)
    assert prompts == experiment.training_prompts(settings.seed, ("single_object", "colors"))
    assert {parse_prompt(p).category for p in prompts} == {"single_object", "colors"}

    parser = demo.build_parser()
    assert demo._settings_from_args(parser.parse_args([])).train_categories == ("single_object", "colors")
    assert demo._settings_from_args(parser.parse_args(["--train-categories", "all"])).train_categories is None
    assert demo._settings_from_args(parser.parse_args(["--train-categories", "counting", "colors"])).train_categories == ("counting", "colors")
    # from a JSON file (a study run, a summary) the list comes back as the same settings
    assert experiment.DemoSettings(**json.loads(json.dumps(asdict(settings)))) == settings


@pytest.mark.parametrize("argv, message", [
    (["--train-categories", "landscapes"], "invalid choice"),
    (["--train-categories", "all", "colors"], "'all' is the whole grammar"),
    (["--steps", "0"], "DemoSettings.train_steps=0 is invalid"),
    (["--ema", "1"], "DemoSettings.ema_decay=1.0 is invalid"),
])
def test_bad_demo_arguments_are_usage_errors_before_any_work(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        demo.main([*argv, "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_demo_settings_reject_bad_training_categories():
    for bad in ((), ("landscapes",), ("colors", "landscapes"), "landscapes"):
        with pytest.raises(ValueError, match=r"train_categories=\(.*landscapes|train_categories=\(\)"):
            experiment.DemoSettings(train_categories=bad)
    assert experiment.DemoSettings(train_categories="colors").train_categories == ("colors",)  # a name, not its letters


def test_hardening_aligns_as_the_shipped_scorer_was_made(monkeypatch):
    """The scorer is hardened against aligned images of every category with 2 leaps, whatever the demo's defaults."""
    import argparse

    from leapalign.shapes import harden

    seen = {}

    def stop(model, scorer, settings, output_dir):
        seen["settings"] = settings
        raise RuntimeError("stop here")

    monkeypatch.setattr(harden, "make_trainer", stop)
    args = argparse.Namespace(model=None, snapshot_every=2, seed=0, batch_size=2, num_steps=3, align_steps=2, samples=2)
    with pytest.raises(RuntimeError, match="stop here"):
        harden._aligned_samples(args, None, 0)
    assert seen["settings"].train_categories is None and seen["settings"].num_leaps == 2
    assert seen["settings"].colour_diversity == 0.0


def test_background_penalty_prices_faint_texture_not_objects():
    from leapalign.rewards.base import call_reward
    from leapalign.shapes.scorer import load_shapes_scorer
    from leapalign.shapes.world import BACKGROUND, render_batch

    specs = eval_prompts(6, seed=2)
    images = render_batch(specs, seed=0)
    clean = experiment.background_penalty(images)
    assert (clean < 1e-3).all()  # exact renders: only the sqrt's epsilon
    bg = (images - torch.tensor(BACKGROUND).view(1, 3, 1, 1)).abs().sum(1, keepdim=True) < 1e-6
    textured = torch.where(bg & (torch.rand(images[:, :1].shape, generator=torch.Generator().manual_seed(0)) < 0.3), images - 0.1, images)
    assert (experiment.background_penalty(textured) > clean + 0.01).all()
    scorer = load_shapes_scorer()
    x = textured.clone().requires_grad_(True)
    r = call_reward(experiment.training_reward(scorer, "score", penalty=5.0), x, [s.text for s in specs])
    torch.testing.assert_close(r, scorer(textured, [s.text for s in specs]) - 5.0 * experiment.background_penalty(textured))
    r.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert experiment.training_reward(scorer, "score", penalty=0.0) is scorer


def test_colour_concentration_prices_one_colour_for_colourless_prompts():
    """Low for ground-truth renders (their colours spread), K - 1 when every colourless prompt's object is repainted
    red or one grey blend (blurring objects off the palette must not look diverse), in between with half of them red,
    where its gradient lowers it; colour prompts' images are not counted."""
    from leapalign.shapes.reward import colour_concentration
    from leapalign.shapes.world import BACKGROUND, COLORS, parse_prompt, render_batch

    prompts = ["a circle", "a square", "a triangle", "two circles", "a circle", "a square", "a triangle", "a square"]
    images = render_batch([parse_prompt(p) for p in prompts], seed=0)
    on_object = (images - torch.tensor(BACKGROUND).view(1, 3, 1, 1)).abs().sum(1, keepdim=True) > 0.3
    red = torch.where(on_object, torch.tensor(COLORS["red"]).view(1, 3, 1, 1), images)
    grey = torch.where(on_object, torch.tensor((0.5, 0.45, 0.45)).view(1, 3, 1, 1), images)
    spread = colour_concentration(images, prompts)
    assert spread < 0.5
    for same in (red, grey):
        torch.testing.assert_close(colour_concentration(same, prompts), torch.tensor(len(COLORS) - 1.0))
    half = torch.cat([red[:4], images[4:]]).double().requires_grad_(True)
    value = colour_concentration(half, prompts)
    assert spread + 0.5 < value < len(COLORS) - 1.5
    value.backward()
    stepped = (half - 1e-3 * half.grad / half.grad.norm()).detach()
    assert colour_concentration(stepped, prompts) < value.detach()
    coloured = ["a red circle", "a red square"] + prompts[2:3]  # one colourless image: nothing to compare
    assert colour_concentration(red[:3], coloured) == 0
    with pytest.raises(ValueError, match="one prompt per image"):
        colour_concentration(images, prompts[:3])


def test_colour_diversity_reaches_the_training_reward(tmp_path):
    from leapalign.rewards.base import call_reward
    from leapalign.shapes.reward import colour_concentration
    from leapalign.shapes.scorer import load_shapes_scorer
    from leapalign.shapes.world import parse_prompt, render_batch

    prompts = ["a circle", "a square", "a red triangle", "two circles"]
    images = render_batch([parse_prompt(p) for p in prompts], seed=1)
    scorer = load_shapes_scorer()
    assert colour_concentration(images, prompts) > 0.01  # three colourless renders: the term is there to see
    r = call_reward(experiment.training_reward(scorer, "score", penalty=5.0, colour_weight=0.3), images, prompts)
    expected = scorer(images, prompts) - 5.0 * experiment.background_penalty(images) - 0.3 * colour_concentration(images, prompts)
    torch.testing.assert_close(r, expected)
    with pytest.raises(ValueError, match="colour_diversity"):
        experiment.DemoSettings(colour_diversity=-1.0)
    assert demo._settings_from_args(demo.build_parser().parse_args(["--colour-diversity", "0.3"])).colour_diversity == 0.3
    # The demo's trainer carries the weight it was given (the default's 0.2 included); 0 with no penalty is the bare scorer.
    from leapalign.shapes.model import load_shapes_model

    for weight in (experiment.DemoSettings().colour_diversity, 0.3):
        settings = replace(experiment.quick_settings(), colour_diversity=weight)
        trainer = experiment.make_trainer(load_shapes_model(), scorer, settings, tmp_path / str(weight))
        assert trainer.reward.colour_weight == weight > 0
    from benchmarks.study_report import COLOUR_KEY
    from leapalign.shapes.evaluator import COLOUR_SHARES_KEY

    assert COLOUR_KEY == COLOUR_SHARES_KEY  # the report's copy of the key (it loads without torch)


def test_lr_schedule_reaches_the_optimiser(tmp_path):
    """``--lr-schedule cosine`` decays the learning rate to 0 over ``train_steps``; the default keeps it constant."""
    from leapalign.shapes.model import load_shapes_model
    from leapalign.shapes.scorer import load_shapes_scorer

    with pytest.raises(ValueError, match="lr_schedule"):
        experiment.DemoSettings(lr_schedule="polynomial_with_restarts")
    assert demo._settings_from_args(demo.build_parser().parse_args(["--lr-schedule", "cosine"])).lr_schedule == "cosine"
    model, scorer = load_shapes_model(), load_shapes_scorer()
    lrs = {}
    for name in ("constant", "cosine"):
        settings = replace(experiment.quick_settings(), train_steps=4, lr_schedule=name)
        trainer = experiment.make_trainer(model, scorer, settings, tmp_path / name)
        lrs[name] = []
        for _ in range(4):
            lrs[name].append(trainer.lr_scheduler.get_last_lr()[0])
            trainer.optimizer.step()  # no gradients: moves nothing, keeps the scheduler's order check quiet
            trainer.lr_scheduler.step()
        lrs[name].append(trainer.lr_scheduler.get_last_lr()[0])
    assert lrs["constant"] == [settings.learning_rate] * 5
    assert lrs["cosine"][0] == settings.learning_rate and lrs["cosine"][-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(lrs["cosine"], lrs["cosine"][1:]))


def test_max_leap_step_keeps_leapalign_leaps_in_the_first_steps(tmp_path):
    """``max_leap_step`` reaches the trainer's LeapAlign objective as ``max_idx`` (capped at T); its leap steps
    are then drawn only from the first N steps, while the default draws from all T."""
    from leapalign.shapes.model import load_shapes_model
    from leapalign.shapes.scorer import load_shapes_scorer

    with pytest.raises(ValueError, match="max_leap_step"):
        experiment.DemoSettings(max_leap_step=1)  # fewer steps than the two leaps need
    assert experiment.objective_kwargs(experiment.DemoSettings(num_steps=3, max_leap_step=8))["max_idx"] == 3
    assert "max_idx" not in experiment.objective_kwargs(experiment.DemoSettings(max_leap_step=8), "drtune")
    model, scorer = load_shapes_model(), load_shapes_scorer()
    drawn = {}
    for n in (None, 5):
        settings = replace(experiment.quick_settings(), num_steps=12, max_leap_step=n)
        trainer = experiment.make_trainer(model, scorer, settings, tmp_path / str(n))
        g = torch.Generator().manual_seed(0)
        drawn[n] = {i for _ in range(200) for i in trainer.objective.sample_steps(g)}
    assert drawn[None] == set(range(12)) and drawn[5] == set(range(5))
    assert demo._settings_from_args(demo.build_parser().parse_args(["--max-leap-step", "6"])).max_leap_step == 6


def test_alignment_runs_roll_out_eagerly_however_long(tmp_path):
    """A compiled rollout rounds differently: the trainer's auto-compile (runs of >= 1000 CPU steps) must
    not change a demo or study run's numbers, so the experiment pins the eager path."""
    from leapalign.shapes.model import load_shapes_model
    from leapalign.shapes.scorer import load_shapes_scorer

    model = load_shapes_model()
    trainer = experiment.make_trainer(model, load_shapes_scorer(), replace(experiment.quick_settings(), train_steps=5000), tmp_path)
    assert trainer.rollout is model


def test_study_judges_the_ema_weights_when_the_settings_keep_an_ema(tmp_path):
    """The study evaluates what the demo evaluates: the EMA swapped in (and the raw weights back after)."""
    from benchmarks import study
    from leapalign.shapes.model import load_shapes_model
    from leapalign.shapes.scorer import load_shapes_scorer

    model, scorer = load_shapes_model(), load_shapes_scorer()
    settings = replace(experiment.quick_settings(), train_steps=1, learning_rate=1e-2, ema_decay=0.5)
    trainer = experiment.make_trainer(model, scorer, settings, tmp_path)
    trainer.training_step()
    raw = [p.detach().clone() for p in trainer.ema.params]
    with study._evaluated_weights(trainer):
        assert all(torch.equal(p, s) for p, s in zip(trainer.ema.params, trainer.ema.shadow))
        assert not all(torch.equal(p, r) for p, r in zip(trainer.ema.params, raw))
    assert all(torch.equal(p, r) for p, r in zip(trainer.ema.params, raw))
    with study._evaluated_weights(object()):  # no EMA: the weights as they are
        pass
