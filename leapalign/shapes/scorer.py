"""A small learned, differentiable reward for the shapes world: the HPS/PickScore analogue.

``ShapesScorer(images [B, 3, H, W] in [0, 1], prompts) -> [B]`` in (0, 1): how well the image
matches the prompt. Two parts:

- a learned **soft detector**: a CNN (with two coordinate channels) whose flattened feature map
  predicts, for each of the 20 (colour, shape) pairs -- shape "unknown" included: blobs the
  evaluator cannot classify -- a distribution over the number of such objects (0-4) and their mean centre;
- a **soft judge** built from the prompt's parsed spec: P(each named group has its count) --
  colour-free groups sum the counts over colours by convolving the distributions --, P(the total
  number of objects is right), and for position prompts a sigmoid of the centre offset along the
  named axis (learned temperature); the score is their product, recalibrated by a learned affine map
  in logit space.

Why this shape: an unstructured "CNN + prompt embedding -> MLP" scorer sat on the chance plateau
(BCE 0.69) for the few hundred CPU steps we can afford; the structured judge learns in minutes.

It is trained by ``python -m leapalign.shapes.scorer --train`` with BCE on image-prompt pairs --
ground-truth renders (positive), near misses from :func:`leapalign.shapes.world.corrupt_spec` and
renders of other prompts (negative), plus samples of the pretrained shapes model labelled by the
rule-based evaluator (so it has seen the model's textures) -- and an auxiliary detection loss
(counts and centres of the objects the exact detector finds). Like HPS or PickScore it is a learned
proxy: the CNN generalises imperfectly and an optimiser can hack it (pixel patterns it reads as a
red circle that are not one); the rule-based evaluator, which never trains, is the judge it is
compared against.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from leapalign.shapes.assets import add_training_args, checkpoint_files, load_checkpoint, save_checkpoint, training_meta
from leapalign.shapes.pools import DETECTED_PAIRS, MAX_COUNT, LabelledPool, model_samples, synthetic_pool
from leapalign.shapes.world import COLORS, IMAGE_SIZE, corrupt_spec, parse_prompt, render_batch, sample_specs

__all__ = [
    "DEFAULT_SCORER_NAME", "ScorerConfig", "ShapesScorer", "load_shapes_scorer", "save_shapes_scorer", "shapes_scorer_files",
    "ranking_accuracy", "fit", "build_parser", "main",
]

DEFAULT_SCORER_NAME = "shapes_scorer"
_SCORER_FILES = ("scorer", "train it with `python -m leapalign.shapes.scorer --train`")  # what a missing file is, how to make it


@dataclass
class ScorerConfig:
    """Sizes of :class:`ShapesScorer` and its input smoothing.

    ``smoothing_sigma`` > 0 makes the score the mean over ``smoothing_draws`` fixed Gaussian noise
    draws of that scale added to the image (randomised smoothing, with the noise frozen so the reward
    stays deterministic); :func:`fit` then trains on noisy images too. A smoothed score cannot be
    moved by pixel patterns much fainter than the noise, which is what a generator first learns to
    exploit in an unsmoothed CNN.
    """

    image_size: int = IMAGE_SIZE
    channels: int = 32
    extra_layers: int = 0  # 3x3 convolutions added at the 8x8 stage: a receptive field wide enough to see a whole shape
    smoothing_sigma: float = 0.0
    smoothing_draws: int = 4

    def __post_init__(self) -> None:
        if self.smoothing_sigma < 0 or self.smoothing_draws < 1 or self.channels < 1 or self.extra_layers < 0 or self.image_size % 4:
            raise ValueError(f"invalid ScorerConfig {self}: need smoothing_sigma >= 0, smoothing_draws >= 1, channels >= 1, "
                             "extra_layers >= 0, image_size % 4 == 0")


class ShapesScorer(nn.Module):
    """Image-prompt match score in (0, 1), differentiable in the image. A ``RewardFn``."""

    def __init__(self, config: ScorerConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or ScorerConfig()
        ch = c.channels
        self.stem = nn.Sequential(
            nn.Conv2d(5, ch, 3, stride=2, padding=1), nn.GELU(),  # 16x16
            nn.Conv2d(ch, ch, 3, padding=1), nn.GELU(),
            nn.Conv2d(ch, ch, 3, stride=2, padding=1), nn.GELU(),  # 8x8
            *(m for _ in range(c.extra_layers) for m in (nn.Conv2d(ch, ch, 3, padding=1), nn.GELU())),
        )
        side = c.image_size // 4
        n_feat = ch * side * side
        # A soft detector: per (colour, shape), how many objects (0-4) and where (mean centre).
        self.count_head = nn.Linear(n_feat, len(DETECTED_PAIRS) * (MAX_COUNT + 1))
        self.center_head = nn.Linear(n_feat, len(DETECTED_PAIRS) * 2)
        # The judge's learned scalars: relation temperature, and a logit-space recalibration.
        self.log_temperature = nn.Parameter(torch.tensor(-2.0))
        self.calib = nn.Parameter(torch.tensor([1.0, 0.0]))
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, c.image_size), torch.linspace(-1, 1, c.image_size), indexing="ij")
        self.register_buffer("coords", torch.stack([xs, ys]).unsqueeze(0), persistent=False)
        noise = torch.randn(max(1, c.smoothing_draws), 1, 3, c.image_size, c.image_size, generator=torch.Generator().manual_seed(0))
        self.register_buffer("smoothing_noise", c.smoothing_sigma * noise, persistent=False)

    def detections(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(count_logits [B, 20, 5], centres [B, 20, 2] in [-1, 1])`` per (colour, shape-or-unknown) pair."""
        s = self.config.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"images must be [B, 3, {s}, {s}] in [0, 1], got shape {tuple(images.shape)}")
        x = images.to(self.coords.device, self.coords.dtype) * 2.0 - 1.0
        h = self.stem(torch.cat([x, self.coords.expand(x.shape[0], -1, -1, -1)], 1)).flatten(1)
        b = images.shape[0]
        return self.count_head(h).view(b, len(DETECTED_PAIRS), MAX_COUNT + 1), torch.tanh(self.center_head(h)).view(b, len(DETECTED_PAIRS), 2)

    def logits(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Pre-sigmoid scores ``[B]`` (what training uses, with BCE)."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts; they must match")
        if self.config.smoothing_sigma <= 0:
            return self.judge(*self.detections(images), prompts)
        k, b = self.smoothing_noise.shape[0], images.shape[0]
        noisy = images.to(self.coords.device, self.coords.dtype).unsqueeze(0) + self.smoothing_noise  # [K, B, 3, S, S]
        z = self.judge(*self.detections(noisy.flatten(0, 1)), list(prompts) * k).view(k, b)
        # The mean probability over the draws, back in logit space.
        return torch.logsumexp(F.logsigmoid(z), 0) - torch.logsumexp(F.logsigmoid(-z), 0)

    def judge(self, count_logits: torch.Tensor, centres: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Match logits ``[B]`` from soft detections and the prompts (parsed by the world's grammar)."""
        probs = count_logits.softmax(-1)  # [B, 20, 5]
        rules = _Rules.of(prompts, probs.device)
        everything = torch.ones_like(rules.group_masks[:, 0])
        logp = _log_prob_sum(probs, everything, rules.total)
        for g in range(2):
            logp = logp + rules.group_valid[:, g] * _log_prob_sum(probs, rules.group_masks[:, g], rules.group_counts[:, g])
        rows = torch.arange(len(prompts), device=probs.device)
        d = centres[rows, rules.pair_b] - centres[rows, rules.pair_a]  # offset from the first object to the second
        along, across = (d * rules.axis).sum(-1), (d * rules.axis.flip(-1)).sum(-1)
        logp = logp + rules.has_relation * F.logsigmoid((along - across.abs()) / self.log_temperature.exp())
        logp = logp.clamp(max=-1e-6)
        logit = logp - torch.log1p(-logp.exp())  # log(p / (1 - p))
        return self.calib[0] * logit + self.calib[1]

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return torch.sigmoid(self.logits(images, prompts))


def _log_prob_sum(probs: torch.Tensor, masks: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``log P(sum of the masked pairs' counts == n)`` per sample, counts independent.

    ``probs [B, K, 5]`` count distributions, ``masks [B, K]`` in {0, 1}, ``n [B]`` int64 in [0, 4].
    A masked-out pair contributes a point mass at 0; the sum's distribution is the convolution.
    """
    b, k, m = probs.shape
    delta = torch.zeros(m, device=probs.device, dtype=probs.dtype)
    delta[0] = 1.0
    dist = delta.expand(b, m)
    for i in range(k):
        p = masks[:, i : i + 1] * probs[:, i] + (1.0 - masks[:, i : i + 1]) * delta
        conv = torch.zeros_like(dist)
        for j in range(m):
            conv = conv + F.pad(dist[:, : m - j], (j, 0)) * p[:, j : j + 1]
        dist = conv  # truncated at m - 1 = 4: prompts never ask for more
    return dist.gather(1, n.view(-1, 1)).squeeze(1).clamp_min(1e-12).log()


@dataclass
class _Rules:
    """A batch of prompts as tensors the soft judge reads (see :meth:`ShapesScorer.judge`)."""

    total: torch.Tensor  # [B] objects in the image
    group_masks: torch.Tensor  # [B, 2, 20] which (colour, shape) pairs each group counts
    group_counts: torch.Tensor  # [B, 2]
    group_valid: torch.Tensor  # [B, 2] float: the prompt has this group
    pair_a: torch.Tensor  # [B] pair of the relation's first object (position prompts)
    pair_b: torch.Tensor  # [B]
    axis: torch.Tensor  # [B, 2] unit vector: the direction the second object must lie in
    has_relation: torch.Tensor  # [B] float

    @classmethod
    def of(cls, prompts: Sequence[str], device: torch.device) -> "_Rules":
        index = {pair: i for i, pair in enumerate(DETECTED_PAIRS)}
        # Offset from the first object to the second, in image coordinates (y down).
        axes = {"left of": (1.0, 0.0), "right of": (-1.0, 0.0), "above": (0.0, 1.0), "below": (0.0, -1.0)}
        b = len(prompts)
        total = torch.zeros(b, dtype=torch.long)
        masks = torch.zeros(b, 2, len(DETECTED_PAIRS))
        counts = torch.zeros(b, 2, dtype=torch.long)
        valid = torch.zeros(b, 2)
        pair_a, pair_b = torch.zeros(b, dtype=torch.long), torch.zeros(b, dtype=torch.long)
        axis, has_rel = torch.zeros(b, 2), torch.zeros(b)
        for i, prompt in enumerate(prompts):
            spec = parse_prompt(prompt)
            total[i] = spec.total_objects
            for g, o in enumerate(spec.objects):
                for c in [o.color] if o.color is not None else COLORS:
                    masks[i, g, index[(c, o.shape)]] = 1.0
                counts[i, g], valid[i, g] = o.count, 1.0
            if spec.relation is not None:
                pair_a[i], pair_b[i] = (index[(o.color, o.shape)] for o in spec.objects)
                axis[i], has_rel[i] = torch.tensor(axes[spec.relation]), 1.0
        t = (total, masks, counts, valid, pair_a, pair_b, axis, has_rel)
        return cls(*(x.to(device) for x in t))


def save_shapes_scorer(scorer: ShapesScorer, out_dir: str | Path, name: str = DEFAULT_SCORER_NAME, meta: dict | None = None) -> Path:
    """Write ``{name}.safetensors`` and ``{name}.json`` (config + ``meta``); returns the weights path."""
    return save_checkpoint(scorer.state_dict(), asdict(scorer.config), out_dir, name, meta)


def shapes_scorer_files(path: str | Path | None = None) -> tuple[Path, Path]:
    """``(weights, json)`` of the scorer at ``path`` (file or directory; ``None``: the shipped one), both present."""
    return checkpoint_files(path, DEFAULT_SCORER_NAME, *_SCORER_FILES)


def load_shapes_scorer(path: str | Path | None = None, device: str | torch.device = "cpu") -> ShapesScorer:
    """The shipped scorer (``leapalign/assets/shapes_scorer.*``) or one at ``path``; frozen, eval mode.

    Its parameters do not require grad, but gradients still flow to the images it scores.
    """
    state, saved = load_checkpoint(path, DEFAULT_SCORER_NAME, *_SCORER_FILES)
    scorer = ShapesScorer(ScorerConfig(**saved["config"]))
    scorer.load_state_dict(state, strict=True)
    return scorer.requires_grad_(False).eval().to(device)


def fit(
    scorer: ShapesScorer,
    pool: LabelledPool,
    steps: int,
    g: torch.Generator,
    batch_size: int = 64,
    lr: float = 3e-3,
    aux_weight: float = 0.5,
    hard: LabelledPool | None = None,
    hard_fraction: float = 0.5,
    desc: str = "scorer",
) -> float:
    """Train ``scorer`` in place (BCE on the labels + ``aux_weight`` x detection loss); returns the final BCE.

    With ``hard`` (samples of image models, hacked ones included), ``hard_fraction`` of every batch is
    drawn from it: those are the images the reward will actually be asked about.
    """
    if not 0.0 <= hard_fraction <= 1.0 or steps < 1 or batch_size < 1:
        raise ValueError(f"fit needs steps >= 1, batch_size >= 1 and hard_fraction in [0, 1]; got {steps}, {batch_size}, {hard_fraction}")
    scorer.train()
    opt = torch.optim.AdamW(scorer.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    n_hard = round(batch_size * hard_fraction) if hard is not None and len(hard) else 0
    bar = tqdm(range(steps), desc=desc, dynamic_ncols=True)
    recent: list[float] = []
    for step in bar:
        parts = [(pool, batch_size - n_hard)] + ([(hard, n_hard)] if n_hard else [])
        batch = [(src, torch.randint(len(src), (k,), generator=g)) for src, k in parts]
        images = torch.cat([src.images[i] for src, i in batch])
        prompts = [src.prompts[j] for src, i in batch for j in i.tolist()]
        labels, counts, centres, present = (torch.cat([getattr(src, a)[i] for src, i in batch]) for a in ("labels", "counts", "centres", "present"))
        if scorer.config.smoothing_sigma > 0:  # train on what the smoothed score looks at
            images = images + scorer.config.smoothing_sigma * torch.randn(images.shape, generator=g)
        count_logits, centre_pred = scorer.detections(images)
        match = F.binary_cross_entropy_with_logits(scorer.judge(count_logits, centre_pred, prompts), labels)
        mask = present.unsqueeze(-1).float()
        aux = F.cross_entropy(count_logits.flatten(0, 1), counts.flatten()) + (((centre_pred - centres) ** 2 * mask).sum() / mask.sum().clamp_min(1.0))
        loss = match + aux_weight * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        recent = (recent + [float(match.detach())])[-50:]
        if step % 10 == 0:
            bar.set_postfix(bce=f"{sum(recent) / len(recent):.4f}", aux=f"{float(aux.detach()):.3f}")
    scorer.eval()
    return sum(recent) / max(1, len(recent))


@torch.no_grad()
def ranking_accuracy(scorer: ShapesScorer, n: int = 600, seed: int = 98765) -> dict[str, float]:
    """Held-out: how often the ground-truth render outscores a near miss / another prompt's render."""
    g = torch.Generator().manual_seed(seed)
    specs = sample_specs(n, g)
    truth = render_batch(specs, g)
    near = render_batch([corrupt_spec(s, g)[0] for s in specs], g)
    others = sample_specs(n, g)
    other = render_batch(others, g)
    keep = torch.tensor([o.text != s.text for o, s in zip(others, specs)])
    prompts = [s.text for s in specs]
    s_true, s_near, s_other = scorer(truth, prompts), scorer(near, prompts), scorer(other, prompts)
    return {
        "vs_near_miss": float((s_true > s_near).float().mean()),
        "vs_mismatched": float((s_true > s_other)[keep].float().mean()),
        "mean_score_truth": float(s_true.mean()),
        "mean_score_near_miss": float(s_near.mean()),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m leapalign.shapes.scorer", description="Train the shapes world's learned reward.")
    p.add_argument("--train", action="store_true", help="train and save (otherwise: evaluate the saved scorer)")
    add_training_args(p, DEFAULT_SCORER_NAME, steps=1500, batch_size=64, lr=3e-3)
    p.add_argument("--pool", type=int, default=8000, help="rendered image-prompt pairs to train on")
    p.add_argument("--aux-weight", type=float, default=0.5, help="weight of the auxiliary detection loss (counts + centres)")
    p.add_argument("--model", type=Path, default=None, help="shapes model checkpoint to draw samples from (default: shipped)")
    p.add_argument("--model-samples", type=int, default=120, help="model samples labelled by the evaluator (0: none)")
    p.add_argument("--model-steps", type=int, default=16, help="Euler steps for those samples")
    p.add_argument("--hard-fraction", type=float, default=0.25, help="share of each batch drawn from the model samples")
    p.add_argument("--smoothing-sigma", type=float, default=0.1, help="input noise of the smoothed score (0: off); see ScorerConfig")
    p.add_argument("--channels", type=int, default=ScorerConfig.channels, help="width of the CNN; see ScorerConfig")
    p.add_argument("--extra-layers", type=int, default=ScorerConfig.extra_layers, help="extra 3x3 convolutions at 8x8; see ScorerConfig")
    return p


def main(argv: list[str] | None = None) -> int:
    """Train (``--train``) or evaluate the scorer. Returns a process exit code."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.train:
        print(json.dumps(ranking_accuracy(load_shapes_scorer(args.out / f"{args.name}.safetensors")), indent=2))
        return 0
    try:
        config = ScorerConfig(channels=args.channels, extra_layers=args.extra_layers, smoothing_sigma=args.smoothing_sigma)
    except ValueError as exc:
        raise SystemExit(f"python -m leapalign.shapes.scorer: error: {exc}") from None
    start = time.time()
    torch.manual_seed(args.seed)
    scorer = ShapesScorer(config)
    g = torch.Generator().manual_seed(args.seed + 1)
    hard = None
    if args.model_samples > 0:
        from leapalign.shapes.model import load_shapes_model  # the scorer itself never needs the image model

        hard = model_samples(load_shapes_model(args.model), args.model_samples, args.model_steps, args.seed)
        print(f"model samples: {len(hard)}, evaluator-correct {float(hard.labels.mean()):.3f} ({time.time() - start:.0f} s)")
    # A fixed pool of pairs, reused for a few epochs: rendering, not the CNN, is the cost on CPU.
    pool = synthetic_pool(args.pool, g)
    print(f"pool: {len(pool)} rendered pairs, {float(pool.labels.mean()):.3f} positive ({time.time() - start:.0f} s)")
    final_bce = fit(scorer, pool, args.steps, g, args.batch_size, args.lr, args.aux_weight, hard, args.hard_fraction)
    rank = ranking_accuracy(scorer)
    minutes = (time.time() - start) / 60
    print(f"trained in {minutes:.1f} min; held-out ranking: " + ", ".join(f"{k} {v:.3f}" for k, v in rank.items()))
    meta = training_meta("leapalign.shapes.scorer", argv, args) | {
        "model_samples": args.model_samples,
        "hard_fraction": args.hard_fraction,
        "train_minutes": round(minutes, 2),
        "final_bce": round(final_bce, 5),
        "held_out_ranking": {k: round(v, 4) for k, v in rank.items()},
    }
    path = save_shapes_scorer(scorer, args.out, args.name, meta)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
