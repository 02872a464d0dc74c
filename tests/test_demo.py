"""``leapalign demo``, its library (``leapalign.shapes.experiment``) and ``python -m benchmarks study`` on the
shipped shapes-world assets, tiny budgets.

The demo test is the CI guarantee behind ``make demo``: the quick run goes end to end through the
real trainer and writes every output with sane contents. The study test runs one point of the
equal-wall-clock study and renders its report. Timings are never asserted.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from leapalign.shapes import demo, experiment
from leapalign.shapes.world import CATEGORIES, eval_prompts

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    return path.is_file() and path.stat().st_size > 100 and path.read_bytes()[:8] == PNG_MAGIC


def test_demo_quick_runs_end_to_end_and_writes_every_output(tmp_path):
    out = tmp_path / "demo_out"
    assert demo.main(["--quick", "--out", str(out), "--no-progress"]) == 0

    for name in ("before_after.png", "curves.png"):
        assert _is_png(out / name), name
    summary = json.loads((out / "summary.json").read_text())
    quick = experiment.quick_settings()
    assert summary["train_steps_done"] == quick.train_steps
    assert summary["command"].startswith("leapalign demo --quick")
    for when in ("before", "after"):
        acc = summary[when]["accuracy"]
        assert set(acc) == set(CATEGORIES) | {"overall"}  # the quick eval set holds one prompt per category
        assert all(0.0 <= v <= 1.0 for v in acc.values())
        assert 0.0 < summary[when]["reward"] < 1.0
    assert math.isclose(summary["accuracy_gain_points"], 100 * (summary["after"]["accuracy"]["overall"] - summary["before"]["accuracy"]["overall"]))
    assert summary["evals"] and summary["evals"][-1]["step"] == quick.train_steps
    assert len(summary["train_metrics"]) == quick.train_steps
    assert all(math.isfinite(m["loss"]) for m in summary["train_metrics"])

    table = json.loads((out / "memory_time.json").read_text())
    rows = {r["method"]: r for r in table["rows"]}
    assert set(rows) == {"leapalign", "full_backprop"}
    assert all(r["T"] == quick.num_steps and r["batch_size"] == quick.batch_size for r in rows.values())
    # LeapAlign keeps two forwards' activations, full BPTT all T of them: it must save less.
    assert 0 < rows["leapalign"]["saved_bytes"] < rows["full_backprop"]["saved_bytes"]
    md = (out / "memory_time.md").read_text()
    assert "| leapalign |" in md and "| full_backprop |" in md and table["command"] in md


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


def test_study_runs_share_points_and_one_point_runs(tmp_path):
    from benchmarks import study
    from leapalign.shapes.scorer import load_shapes_scorer

    specs = study.study_runs(["methods", "alpha", "leaps"])
    labels = [s["label"] for s in specs]
    assert len(labels) == len(set(labels)) == len(study.METHODS) + len(study.ALPHAS) - 1 + len(study.LEAPS) - 1
    shared = next(s for s in specs if s["label"] == "leapalign a=0.3 leaps=2")
    assert shared["groups"] == ["methods", "alpha", "leaps"]

    point = next(s for s in specs if s["label"] == "leapalign a=0.3 leaps=3")
    settings = replace(experiment.quick_settings(), max_train_seconds=0.01, train_steps=100, eval_prompts=6)
    from leapalign.shapes.model import load_shapes_model

    base = load_shapes_model()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    run = study.run_one(point, seed=0, settings=settings, scorer=load_shapes_scorer(), base_model=base)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())  # each run trains a copy
    assert run["steps"] == 1  # the budget stops it after the first step
    assert set(run["accuracy"]) == set(CATEGORIES) | {"overall"}

    data = {
        "command": "python -m benchmarks study (test)", "machine": {"cpu": "test"}, "settings": {**vars(settings), "max_train_seconds": 0.01},
        "seeds": [0], "specs": [dict(point)], "baseline": run, "runs": [run], "reading": "",
    }
    data["summary"] = study.summarise(data["runs"])
    md = study.markdown_report(data)
    assert "| leapalign a=0.3 leaps=3 | 1 |" in md and "## LeapAlign number of leaps" in md
    assert _is_png(study.plot(data, tmp_path / "study.png"))


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
