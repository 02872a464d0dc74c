"""``python -m benchmarks screen``: the demo with one change -- objective, config override or a scorer ensemble --
and everything else the demo's."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import screen
from leapalign.shapes import experiment
from leapalign.shapes.world import eval_prompts, render_batch


@pytest.fixture(scope="module")
def assets():
    from leapalign.shapes.model import load_shapes_model
    from leapalign.shapes.scorer import load_shapes_scorer

    return load_shapes_model(), load_shapes_scorer()


def test_trainer_factory_passes_the_objective_and_its_overrides(tmp_path, assets):
    model, scorer = assets
    settings = experiment.quick_settings()
    plain = experiment.make_trainer(model, scorer, settings, tmp_path / "plain")
    same = screen.trainer_factory("leapalign", {})(model, scorer, settings, tmp_path / "same")
    assert list(same.prompt_source.prompts) == list(plain.prompt_source.prompts)
    assert same.objective.config == plain.objective.config

    tuned = screen.trainer_factory("leapalign", {"tau": 0.02})(model, scorer, settings, tmp_path / "t")
    assert tuned.objective.config.tau == 0.02 and plain.objective.config.tau != 0.02
    assert list(tuned.prompt_source.prompts) == list(plain.prompt_source.prompts)

    other = screen.trainer_factory("drtune", {})(model, scorer, settings, tmp_path / "d")
    assert type(other.objective).__name__ != type(plain.objective).__name__
    assert other.objective.config.num_steps == settings.num_steps


def test_scorer_ensemble_is_the_mean_probability_and_passes_gradients(assets):
    from leapalign.shapes.scorer import ShapesScorer

    _, scorer = assets
    other = ShapesScorer(scorer.config)
    other.load_state_dict(scorer.state_dict())
    with torch.no_grad():
        other.calib[1] += 1.0  # a different scorer: shifted logits
    specs = eval_prompts(4, seed=5)
    prompts = [s.text for s in specs]
    images = render_batch(specs, seed=6).requires_grad_(True)
    p1, p2 = scorer(images, prompts), other(images, prompts)
    p = screen.scorer_ensemble([scorer, other])(images, prompts)
    assert not torch.allclose(p1, p2)
    # Bit for bit the stacked mean the fourth pass's ensemble runs were made with.
    assert torch.equal(p, torch.stack([p1, p2]).mean(0))
    p.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    three = screen.scorer_ensemble([scorer, other, scorer])(images, prompts)
    torch.testing.assert_close(three, (2 * p1 + p2) / 3)


@pytest.mark.parametrize("argv, message", [
    (["--ensemble", "a", "--"], "two or more"),
    (["--ensemble", "a", "b", "--", "--scorer", "c"], "one or the other"),
    (["--ensemble", "/nonexistent/a", "/nonexistent/b", "--"], "not found"),
    (["--set", "tau", "--"], "KEY=VALUE"),
    (["--set", "taus=0.1", "--"], "valid fields"),
    (["--set", "tau=-1", "--"], "tau must be > 0"),
    (["--ensemble", "a", "b", "--", "--scorer=c"], "one or the other"),
    (["--ensemble", "a", "b", "--", "--reward", "log_score"], "no logits"),
    (["--ensemble", "a", "b", "--", "--reward=log_score"], "no logits"),
    (["--", "--train-categories", "landscapes"], "invalid choice"),
])
def test_bad_screen_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        screen.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_a_screen_runs_the_demo_and_records_its_own_command(tmp_path):
    out = tmp_path / "out"
    argv = ["--set", "tau=0.05", "--", "--quick", "--train-categories", "single_object", "--out", str(out), "--no-progress", "--threads", "1"]
    assert screen.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["command"].startswith("python -m benchmarks screen --set tau=0.05 -- --quick --train-categories single_object")
    assert summary["settings"]["train_categories"] == ["single_object"]
    assert summary["runs"][0]["train_steps_done"] == experiment.quick_settings().train_steps
