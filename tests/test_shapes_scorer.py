"""The shapes world's learned reward: a differentiable RewardFn that ranks matching pairs first."""
from __future__ import annotations

import pytest
import torch

from leapalign.rewards.base import RewardNotDifferentiableError, call_reward
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
