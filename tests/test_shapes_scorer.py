"""The shapes world's learned reward: a differentiable RewardFn that ranks matching pairs first."""
from __future__ import annotations

import json
import math

import pytest
import torch

from leapalign.rewards.base import RewardNotDifferentiableError, call_reward
from leapalign.shapes.evaluator import evaluate
from leapalign.shapes.scorer import ShapesScorer, load_shapes_scorer, ranking_accuracy, save_shapes_scorer
from leapalign.shapes.world import eval_prompts, render_batch


@pytest.fixture(scope="module")
def scorer() -> ShapesScorer:
    return load_shapes_scorer()


def test_scorer_is_a_differentiable_reward(scorer):
    specs = eval_prompts(6, seed=0)
    images = render_batch(specs, seed=0).requires_grad_(True)
    rewards = call_reward(scorer, images, [s.text for s in specs])
    assert rewards.shape == (6,) and ((rewards > 0) & (rewards < 1)).all()
    rewards.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert (images.grad.abs().flatten(1).sum(1) > 0).all()  # every image gets its own gradient
    assert not any(p.requires_grad for p in scorer.parameters())  # the reward is frozen


def test_gradient_matches_finite_differences(scorer):
    spec = eval_prompts(1, seed=3)
    image = render_batch(spec, seed=1).double()
    s64 = ShapesScorer(scorer.config).double()
    s64.load_state_dict(scorer.state_dict())
    prompts = [spec[0].text]
    image.requires_grad_(True)
    s64(image, prompts).sum().backward()
    direction = torch.randn(image.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eps = 1e-5
    with torch.no_grad():
        fd = (s64(image + eps * direction, prompts) - s64(image - eps * direction, prompts)) / (2 * eps)
    torch.testing.assert_close((image.grad * direction).sum(), fd.sum(), rtol=1e-4, atol=1e-8)


def test_detaching_reward_is_caught():
    untrained = ShapesScorer()
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    with pytest.raises(RewardNotDifferentiableError):
        call_reward(lambda im, p: untrained(im.detach(), p), images, ["a circle", "a square"])


def test_ranks_ground_truth_above_wrong_pairs_on_held_out_prompts(scorer):
    rank = ranking_accuracy(scorer, n=150, seed=424242)
    assert rank["vs_mismatched"] >= 0.8, rank
    assert rank["vs_near_miss"] >= 0.7, rank
    # An untrained scorer is at chance: the test can fail.
    torch.manual_seed(0)
    assert ranking_accuracy(ShapesScorer(), n=60, seed=424242)["vs_near_miss"] < 0.65


def test_save_load_round_trip(tmp_path, scorer):
    save_shapes_scorer(scorer, tmp_path, meta={"note": "test"})
    again = load_shapes_scorer(tmp_path)
    images = render_batch(eval_prompts(3, seed=1), seed=2)
    prompts = [s.text for s in eval_prompts(3, seed=1)]
    torch.testing.assert_close(again(images, prompts), scorer(images, prompts))
    with pytest.raises(FileNotFoundError, match="--train"):
        load_shapes_scorer(tmp_path / "missing")


def test_a_wider_deeper_scorer_round_trips_and_keeps_the_shipped_layout(tmp_path):
    from leapalign.shapes.scorer import ScorerConfig

    deep = ShapesScorer(ScorerConfig(channels=8, extra_layers=2))
    convs = [m for m in deep.stem if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 5 and all(c.out_channels == 8 for c in convs)
    save_shapes_scorer(deep, tmp_path)
    again = load_shapes_scorer(tmp_path)
    assert again.config == deep.config
    images = render_batch(eval_prompts(3, seed=1), seed=2)
    prompts = [s.text for s in eval_prompts(3, seed=1)]
    torch.testing.assert_close(again(images, prompts), deep(images, prompts))
    # extra_layers = 0 is the layout the shipped checkpoint was saved in (it loads with strict=True).
    assert sum(isinstance(m, torch.nn.Conv2d) for m in load_shapes_scorer().stem) == 3


def test_labelled_pool_uses_the_evaluator_and_detector():
    from leapalign.shapes.pools import LabelledPool

    specs = eval_prompts(6, seed=5)
    truth = render_batch(specs, seed=5)
    blank = torch.full_like(truth, 0.95)  # background only: every prompt names an object, so all wrong
    pool = LabelledPool.label(torch.cat([truth, blank]), [s.text for s in specs] * 2)
    assert pool.labels.tolist() == [1.0] * 6 + [0.0] * 6
    total = torch.tensor([s.total_objects for s in specs])
    assert torch.equal(pool.counts[:6].sum(1), total)  # the detector finds every drawn object (all counts <= 4)
    assert pool.counts[6:].sum() == 0 and not pool.present[6:].any()
    both = pool + pool
    assert len(both) == 24 and both.prompts[12:] == pool.prompts and torch.equal(both.labels[12:], pool.labels)


def test_fit_learns_from_a_pool_and_draws_hard_samples():
    """A few steps on a small pool lower the BCE; the hard pool is actually sampled."""
    from leapalign.shapes.pools import LabelledPool, synthetic_pool
    from leapalign.shapes.scorer import fit

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    pool = synthetic_pool(96, g)
    seen: list[int] = []

    class Spy(LabelledPool):
        def __getattribute__(self, name):
            if name == "images":
                seen.append(1)
            return super().__getattribute__(name)

    hard = Spy(*(getattr(pool, f) for f in ("images", "prompts", "labels", "counts", "centres", "present")))
    scorer = ShapesScorer()
    first = fit(scorer, pool, 1, torch.Generator().manual_seed(1), batch_size=32, lr=3e-3)
    last = fit(scorer, pool, 40, torch.Generator().manual_seed(1), batch_size=32, lr=3e-3, hard=hard, hard_fraction=0.5)
    assert last < first
    assert seen, "the hard pool was never drawn from"
    assert not scorer.training


def test_auc():
    from leapalign.shapes.harden import auc

    assert auc(torch.tensor([0.9, 0.8, 0.1]), torch.tensor([1.0, 1.0, 0.0])) == 1.0
    assert auc(torch.tensor([0.1, 0.9]), torch.tensor([1.0, 0.0])) == 0.0
    assert auc(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0])) == 0.5
    assert math.isnan(auc(torch.tensor([0.5]), torch.tensor([1.0])))


def test_harden_runs_a_round_and_records_it(tmp_path):
    import json

    from leapalign.shapes.harden import main

    args = ["--out", str(tmp_path), "--rounds", "1", "--align-steps", "2", "--snapshot-every", "1", "--samples", "6",
            "--base-samples", "6", "--pool", "48", "--steps", "3", "--batch-size", "2", "--T", "3"]
    assert main(args) == 0
    meta = json.loads((tmp_path / "shapes_scorer.json").read_text())["meta"]
    rounds = meta["harden"]["rounds"]
    assert len(rounds) == 1 and rounds[0]["samples"] == 12
    assert meta["harden"]["hard_samples"] == 6 + 12 + 12  # base + snapshots + their pixel attacks
    assert load_shapes_scorer(tmp_path)(render_batch(eval_prompts(2, seed=0), seed=0), [s.text for s in eval_prompts(2, seed=0)]).shape == (2,)
    with pytest.raises(SystemExit, match="--rounds"):
        main(["--out", str(tmp_path), "--rounds", "0"])
    with pytest.raises(SystemExit, match="--hard-fraction"):
        main(["--out", str(tmp_path), "--hard-fraction", "1.5"])
    with pytest.raises(SystemExit, match="--focus and --focus-samples"):
        main(["--out", str(tmp_path), "--focus-samples", "4"])


def test_harden_focus_samples_only_the_named_categories(tmp_path):
    import json

    from leapalign.shapes.harden import _unaligned_samples, build_parser, main
    from leapalign.shapes.world import parse_prompt

    args = build_parser().parse_args(["--out", str(tmp_path), "--base-samples", "0", "--focus", "two_object", "counting",
                                      "--focus-samples", "8", "--T", "3"])
    pool = _unaligned_samples(args)
    assert len(pool) == 8 and {parse_prompt(p).category for p in pool.prompts} <= {"two_object", "counting"}
    # --rounds 0: only the refit on the unaligned samples.
    assert main(["--out", str(tmp_path), "--rounds", "0", "--base-samples", "4", "--focus", "two_object", "--focus-samples", "4",
                 "--base-refit-steps", "2", "--aux-weight", "2", "--pool", "48", "--T", "3"]) == 0
    meta = json.loads((tmp_path / "shapes_scorer.json").read_text())["meta"]
    assert meta["harden"]["hard_samples"] == 4 + 4 and meta["harden"]["rounds"] == []  # base + focus
    with pytest.raises(SystemExit, match="--rounds"):
        main(["--out", str(tmp_path), "--rounds", "0"])
    with pytest.raises(SystemExit, match="needs unaligned samples"):
        main(["--out", str(tmp_path), "--base-samples", "0", "--base-refit-steps", "5"])


def test_bad_scorer_and_fit_settings_are_rejected():
    from leapalign.shapes.pools import synthetic_pool
    from leapalign.shapes.scorer import ScorerConfig, fit

    with pytest.raises(ValueError, match="smoothing_sigma"):
        ScorerConfig(smoothing_sigma=-0.1)
    with pytest.raises(ValueError, match="extra_layers"):
        ScorerConfig(extra_layers=-1)
    from leapalign.shapes.scorer import main

    with pytest.raises(SystemExit, match="scorer: error: invalid ScorerConfig"):
        main(["--train", "--out", "/nonexistent/never-written", "--channels", "0"])
    with pytest.raises(ValueError, match="hard_fraction"):
        fit(ShapesScorer(), synthetic_pool(8, torch.Generator().manual_seed(0)), 1, torch.Generator(), hard_fraction=2.0)


def test_pixel_attack_raises_the_score_and_relabels():
    from leapalign.shapes.pools import LabelledPool, pixel_attack

    specs = eval_prompts(6, seed=11)
    blank = torch.full((6, 3, 32, 32), 0.95)
    pool = LabelledPool.label(blank, [s.text for s in specs])
    scorer = load_shapes_scorer()
    attacked = pixel_attack(scorer, pool, steps=5)
    assert attacked.images.min() >= 0 and attacked.images.max() <= 1
    with torch.no_grad():
        assert scorer(attacked.images, attacked.prompts).mean() > scorer(blank, pool.prompts).mean()
    verdicts = [float(j.correct) for j in evaluate(attacked.images, attacked.prompts)]
    assert attacked.labels.tolist() == verdicts


def test_smoothed_score_is_the_mean_probability_over_the_frozen_noise_draws():
    from leapalign.shapes.scorer import ScorerConfig

    trained = load_shapes_scorer().state_dict()  # an untrained CNN is nearly constant: noise would not show
    smooth = ShapesScorer(ScorerConfig(smoothing_sigma=0.2, smoothing_draws=3)).eval()
    plain = ShapesScorer(ScorerConfig()).eval()
    smooth.load_state_dict(trained)
    plain.load_state_dict(trained)
    specs = eval_prompts(4, seed=2)
    images, prompts = render_batch(specs, seed=2), [s.text for s in specs]
    with torch.no_grad():
        expected = torch.stack([plain(images + smooth.smoothing_noise[k], prompts) for k in range(3)]).mean(0)
        torch.testing.assert_close(smooth(images, prompts), expected)
        torch.testing.assert_close(smooth(images, prompts), smooth(images, prompts))  # deterministic
        assert not torch.allclose(smooth(images, prompts), plain(images, prompts))  # the noise does something


def test_ranking_ceiling_of_an_oracle_and_an_anti_oracle():
    """The oracle (the evaluator itself) picks a correct sample wherever one exists; its inverse ranks every pair wrong."""
    from leapalign.shapes.ceiling import markdown_table, ranking_ceiling
    from leapalign.shapes.model import load_shapes_model
    from leapalign.shapes.world import parse_prompt

    def oracle(images, prompts):
        return torch.tensor([float(j.correct) for j in evaluate(images, [parse_prompt(p) for p in prompts])])

    model = load_shapes_model()
    kwargs = dict(prompts=12, draws=3, num_steps=4, seed=3, show_progress=False)
    best = ranking_ceiling(model, oracle, **kwargs)
    worst = ranking_ceiling(model, lambda im, p: 1.0 - oracle(im, p), **kwargs)
    for cat, row in best.items():
        assert row["top1"] == row["any"] and worst[cat]["average"] == row["average"]
        assert worst[cat]["top1"] <= row["average"] <= row["top1"]
        if row["auc"] == row["auc"]:  # defined: some prompt with a correct and a wrong sample
            assert row["auc"] == 1.0 and worst[cat]["auc"] == 0.0
    assert 0 < best["overall"]["any"] < 1, "the test needs prompts with and without a correct sample"
    assert "within-prompt AUC" in markdown_table(best)
    with pytest.raises(ValueError, match="draws >= 2"):
        ranking_ceiling(model, oracle, prompts=2, draws=1)
    from leapalign.shapes.ceiling import main

    with pytest.raises(SystemExit, match="ceiling: error: scorer file .* not found"):
        main(["--scorer", "/nonexistent/scorer"])
    with pytest.raises(SystemExit, match="ceiling: error: need prompts >= 1 and draws >= 2"):
        main(["--draws", "1"])


def test_ceiling_json_goes_to_a_new_folder_and_a_directory_is_refused_up_front(tmp_path, capsys):
    from leapalign.shapes.ceiling import main

    with pytest.raises(SystemExit, match="is a directory"):
        main(["--json", str(tmp_path)])
    assert capsys.readouterr().out == "", "refused before any sampling"
    out = tmp_path / "new" / "dir" / "ceiling.json"
    assert main(["--prompts", "6", "--draws", "2", "--T", "2", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["draws"] == 2 and set(saved["result"]) >= {"overall"}
