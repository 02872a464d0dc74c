"""The shapes world's generator and its exact evaluator: ground truth passes, noise and near-misses fail."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from leapalign.shapes.evaluator import accuracy_by_category, classify_shape, detect_objects, evaluate
from leapalign.shapes.world import (
    CATEGORIES,
    CORRUPTIONS,
    ObjectSpec,
    Placement,
    PromptSpec,
    SHAPES,
    corrupt_spec,
    draw_shape,
    eval_prompts,
    parse_prompt,
    render,
    render_batch,
    sample_specs,
)


@pytest.fixture(scope="module")
def specs() -> list[PromptSpec]:
    return eval_prompts(120, seed=7)


def test_ground_truth_renders_are_judged_correct(specs):
    images = render_batch(specs, seed=3)
    acc = accuracy_by_category(evaluate(images, [s.text for s in specs]))
    assert set(acc) == set(CATEGORIES) | {"overall"}
    assert all(v >= 0.99 for v in acc.values()), acc


@pytest.mark.parametrize("kind", ["uniform", "gaussian", "blank"])
def test_noise_is_judged_wrong(specs, kind):
    g = torch.Generator().manual_seed(11)
    n = len(specs)
    images = {
        "uniform": lambda: torch.rand(n, 3, 32, 32, generator=g),
        "gaussian": lambda: (0.5 + 0.5 * torch.randn(n, 3, 32, 32, generator=g)).clamp(0, 1),
        "blank": lambda: torch.full((n, 3, 32, 32), 0.95),
    }[kind]()
    acc = accuracy_by_category(evaluate(images, [s.text for s in specs]))
    assert acc["overall"] <= 0.01, acc


@pytest.mark.parametrize("category", CATEGORIES)
def test_every_corruption_is_judged_wrong(category):
    g = torch.Generator().manual_seed(5)
    for kind in CORRUPTIONS[category]:
        originals = sample_specs(8, g, categories=(category,))
        corrupted = [corrupt_spec(s, g, kind)[0] for s in originals]
        images = render_batch(corrupted, seed=g)
        verdicts = evaluate(images, originals)
        assert not any(v.correct for v in verdicts), [(v.prompt, kind) for v in verdicts if v.correct]
        # The same images do satisfy the corrupted specs: the corruption, not the render, is judged.
        assert all(v.correct for v in evaluate(images, corrupted))


def test_swapped_positions_and_extra_object_are_wrong():
    spec = parse_prompt("a red circle above a blue square")
    above = [Placement("circle", "red", 10, 2, 9), Placement("square", "blue", 10, 20, 9)]
    swapped = [Placement("circle", "red", 10, 20, 9), Placement("square", "blue", 10, 2, 9)]
    extra = above + [Placement("triangle", "green", 22, 12, 8)]
    images = torch.stack([render(above), render(swapped), render(extra)])
    verdicts = evaluate(images, [spec] * 3)
    assert [v.correct for v in verdicts] == [True, False, False]
    assert "relation" in verdicts[1].reason and "expected 2" in verdicts[2].reason


def test_wrong_colour_pixels_are_not_matched():
    img = render([Placement("square", "red", 5, 5, 10)])
    img[:, 5:15, 5:15] = torch.tensor([0.9, 0.5, 0.1]).view(3, 1, 1)  # orange: far from every palette colour
    assert detect_objects(img[None])[0] == []


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", [7, 8, 10, 12])
def test_shape_classification_of_drawn_shapes(shape, size):
    img = torch.zeros(3, 32, 32)
    draw_shape(img, shape, (1.0, 1.0, 1.0), 3, 4, size)
    mask = img[0] > 0
    ys, xs = mask.nonzero(as_tuple=True)
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    assert classify_shape(crop) == shape
    # Ragged edges (a few pixels flipped on the outline) do not change the verdict.
    ragged = crop.clone()
    ragged[0, ragged.shape[1] // 2] = ~ragged[0, ragged.shape[1] // 2]
    ragged[-1, 0] = ~ragged[-1, 0]
    assert classify_shape(ragged) == shape
    # A thin bar and a plus sign are no shape at all.
    assert classify_shape(torch.ones(2, 9, dtype=torch.bool)) == "unknown"
    plus = torch.zeros(9, 9, dtype=torch.bool)
    plus[4, :] = plus[:, 4] = True
    assert classify_shape(plus) == "unknown"


def test_prompts_round_trip_and_bad_prompts_raise():
    for spec in sample_specs(200, seed=1):
        assert parse_prompt(spec.text) == spec
    for bad in ["a red dog", "a circle and a red square", "five circles", "a circle left of a square", ""]:
        with pytest.raises(ValueError, match="grammar"):
            parse_prompt(bad)
    with pytest.raises(ValueError, match="distinguishable"):
        PromptSpec("two_object", (ObjectSpec("circle"), ObjectSpec("circle")))


def test_generation_is_deterministic_and_eval_set_is_balanced():
    a, b = eval_prompts(60, seed=2), eval_prompts(60, seed=2)
    assert a == b and a != eval_prompts(60, seed=3)
    assert {c: sum(s.category == c for s in a) for c in CATEGORIES} == {c: 10 for c in CATEGORIES}
    assert torch.equal(render_batch(a[:8], seed=4), render_batch(a[:8], seed=4))
    assert not torch.equal(render_batch(a[:8], seed=4), render_batch(a[:8], seed=5))
    assert sample_specs(30, seed=9) == sample_specs(30, seed=9)


def test_grammar_enumerates_every_prompt_the_sampler_draws():
    from leapalign.shapes.split import grammar_specs

    grammar = {c: {s.text for s in grammar_specs(c)} for c in CATEGORIES}
    assert {c: len(t) for c, t in grammar.items()} == {
        "single_object": 3, "colors": 15, "two_object": 6, "counting": 9, "position": 840, "color_attr": 120}
    assert all(len(grammar_specs(c)) == len(grammar[c]) for c in CATEGORIES)  # no duplicates
    for spec in sample_specs(3000, seed=11):
        assert spec.text in grammar[spec.category]
        assert parse_prompt(spec.text) == spec


def test_heldout_split_is_disjoint_from_alignment_training(tmp_path):
    """The held-out split: >= 1 prompt held out and >= 1 kept per category, fixed (CRC-32, not hash());
    the alignment runs' training prompts (training_specs, what make_trainer uses) never contain it;
    the held-out eval set contains only it."""
    from leapalign.shapes import experiment
    from leapalign.shapes.split import grammar_specs, heldout_eval_prompts, heldout_texts, is_heldout, training_specs

    held = heldout_texts()
    assert len(held) == 200
    for c in CATEGORIES:
        n_held = sum(s.text in held for s in grammar_specs(c))
        assert 1 <= n_held < len(grammar_specs(c))
    # Pinned members: a changed split would silently change every held-out figure ever reported.
    assert {"a square", "a circle and a square", "three squares", "two triangles"} <= held
    assert is_heldout("a  Square") and not is_heldout("a circle")

    train = training_specs(20_000, seed=3)
    assert not any(s.text in held for s in train)
    assert {s.category for s in train} == set(CATEGORIES)
    evalset = heldout_eval_prompts(96, seed=4321)
    assert all(s.text in held for s in evalset) and {s.category for s in evalset} == set(CATEGORIES)
    assert evalset == heldout_eval_prompts(96, seed=4321)
    # The trainer the demo and the study build gets exactly training_specs' prompts (all of them, or those of the
    # training categories), so never a held-out one.
    from leapalign.shapes.model import load_shapes_model
    from leapalign.shapes.scorer import load_shapes_scorer

    settings = replace(experiment.quick_settings(), train_categories=None)
    trainer = experiment.make_trainer(load_shapes_model(), load_shapes_scorer(), settings, tmp_path)
    assert list(trainer.prompt_source.prompts) == [s.text for s in training_specs(4096, seed=settings.seed + 100_003)]
    some = experiment.training_prompts(settings.seed, ["counting", "position"])
    assert not any(p in held for p in list(trainer.prompt_source.prompts) + some)


def test_training_prompts_of_some_categories_come_from_the_demos_sampler():
    """Filtered prompts are the whole-grammar sampler's own prompts of those categories, in order, never held-out ones."""
    from leapalign.shapes.split import is_heldout, training_prompts

    whole = training_prompts(3)
    some = training_prompts(3, ["colors", "position"], n=300)
    assert len(some) == 300 and {parse_prompt(p).category for p in some} == {"colors", "position"}
    assert some[:20] == [p for p in whole if parse_prompt(p).category in ("colors", "position")][:20]
    assert not any(is_heldout(parse_prompt(p)) for p in some)
    for bad in ([], ["landscapes"]):
        with pytest.raises(ValueError, match="subset"):
            training_prompts(3, bad)


def test_free_colour_shares_see_a_collapse_to_one_colour_on_prompts_that_name_none():
    from leapalign.shapes.evaluator import free_colour_shares
    from leapalign.shapes.world import BACKGROUND, COLORS

    specs = [s for s in eval_prompts(60, seed=5) if s.category in ("single_object", "counting", "two_object", "colors")]
    images = render_batch(specs, seed=0)
    shares = free_colour_shares(evaluate(images, specs))
    assert sum(shares.values()) == pytest.approx(1.0) and set(shares) == set(COLORS)
    assert max(shares.values()) < 0.5  # ground-truth renders draw colourless prompts in every colour
    # Every object painted red: the share of red is 1 on colourless prompts; colour prompts are not counted at all.
    bg = torch.tensor(BACKGROUND).view(1, 3, 1, 1)
    is_object = (images - bg).abs().sum(1, keepdim=True) > 1e-6
    red = torch.where(is_object, torch.tensor(COLORS["red"]).view(1, 3, 1, 1), images)
    assert free_colour_shares(evaluate(red, specs))["red"] == 1.0
    only_colour_prompts = [i for i, s in enumerate(specs) if s.category == "colors"]
    assert free_colour_shares(evaluate(images[only_colour_prompts], [specs[i] for i in only_colour_prompts])) == {}


def test_background_artifacts_count_off_colour_background_only():
    from leapalign.shapes.evaluator import background_artifact_share
    from leapalign.shapes.world import BACKGROUND

    specs = eval_prompts(12, seed=3)
    images = render_batch(specs, seed=0)
    assert torch.equal(background_artifact_share(images), torch.zeros(12))  # ground truth: exactly 0
    bg = (images - torch.tensor(BACKGROUND).view(1, 3, 1, 1)).abs().sum(1, keepdim=True) < 1e-6
    g = torch.Generator().manual_seed(0)
    # A faint dotted texture on a quarter of the background: invisible to the evaluator, counted here.
    dots = (torch.rand(images.shape[0], 1, *images.shape[2:], generator=g) < 0.25) & bg
    textured = torch.where(dots, images - 0.15, images)
    assert all(j.correct for j in evaluate(textured, specs))
    share = background_artifact_share(textured)
    assert ((share > 0.15) & (share < 0.35)).all(), share
    # Changes inside the objects are not background artifacts.
    tinted = torch.where(bg, images, (images * 0.9).clamp(0, 1))
    assert torch.equal(background_artifact_share(tinted), torch.zeros(12))


def test_names_no_colour_is_true_only_where_any_colour_passes():
    from leapalign.shapes.world import parse_prompt

    assert parse_prompt("a circle").names_no_colour and parse_prompt("three squares").names_no_colour
    assert parse_prompt("a circle and a triangle").names_no_colour
    assert not parse_prompt("a red circle").names_no_colour
    assert not parse_prompt("a red circle and a blue square").names_no_colour
