"""A small learned, differentiable reward for the shapes world: the HPS/PickScore analogue.

``ShapesScorer(images [B, 3, H, W] in [0, 1], prompts) -> [B]`` in (0, 1): the predicted
probability that the image shows what the prompt says. A CNN (with two coordinate channels, so
positions are easy to read) is modulated by a prompt embedding (FiLM) and read out through a
flattened -- not pooled -- feature map, so "left of" and "above" stay learnable.

It is trained by ``python -m leapalign.shapes.scorer --train`` on ground-truth renders (positive),
near-miss renders from :func:`leapalign.shapes.world.corrupt_spec` and renders of other prompts
(negative), plus samples of the pretrained shapes model labelled by the rule-based evaluator (so it
has seen the model's own textures). Like HPS or PickScore it is a learned proxy: it generalises
imperfectly and can be hacked by an optimiser; the rule-based evaluator, which never trains, is the
judge it is compared against.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from leapalign.shapes.evaluator import evaluate
from leapalign.shapes.text import VOCAB, ShapesTokenizer
from leapalign.shapes.world import IMAGE_SIZE, corrupt_spec, render_batch, sample_specs

__all__ = [
    "DEFAULT_SCORER_NAME",
    "ScorerConfig",
    "ShapesScorer",
    "load_shapes_scorer",
    "save_shapes_scorer",
    "ranking_accuracy",
    "build_parser",
    "main",
]

DEFAULT_SCORER_NAME = "shapes_scorer"
_ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"


@dataclass
class ScorerConfig:
    """Sizes of :class:`ShapesScorer`."""

    image_size: int = IMAGE_SIZE
    vocab_size: int = len(VOCAB)
    max_length: int = 8
    token_dim: int = 32
    text_dim: int = 128
    channels: int = 32
    hidden: int = 128


class ShapesScorer(nn.Module):
    """Image-prompt match score in (0, 1), differentiable in the image. A ``RewardFn``."""

    def __init__(self, config: ScorerConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or ScorerConfig()
        self.tokenizer = ShapesTokenizer(c.max_length)
        self.token_embedding = nn.Embedding(c.vocab_size, c.token_dim)
        self.text_mlp = nn.Sequential(nn.Linear(c.max_length * c.token_dim, c.text_dim), nn.GELU(), nn.Linear(c.text_dim, c.text_dim))
        ch = c.channels
        self.stem = nn.Sequential(
            nn.Conv2d(5, ch, 3, padding=1), nn.GELU(),
            nn.Conv2d(ch, ch, 3, stride=2, padding=1), nn.GELU(),  # 16x16
            nn.Conv2d(ch, ch, 3, stride=2, padding=1), nn.GELU(),  # 8x8
        )
        self.film = nn.Linear(c.text_dim, 2 * ch)
        self.head_conv = nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1), nn.GELU())
        side = c.image_size // 4
        self.head = nn.Sequential(nn.Linear(ch * side * side + c.text_dim, c.hidden), nn.GELU(), nn.Linear(c.hidden, 1))
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, c.image_size), torch.linspace(-1, 1, c.image_size), indexing="ij")
        self.register_buffer("coords", torch.stack([xs, ys]).unsqueeze(0), persistent=False)

    def logits(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Pre-sigmoid scores ``[B]`` (what training uses, with BCE)."""
        s = self.config.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"images must be [B, 3, {s}, {s}] in [0, 1], got shape {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts; they must match")
        dev = self.coords.device
        ids = self.tokenizer.encode(list(prompts)).to(dev)
        text = self.text_mlp(self.token_embedding(ids).flatten(1))
        x = images.to(dev, self.coords.dtype) * 2.0 - 1.0
        x = torch.cat([x, self.coords.expand(x.shape[0], -1, -1, -1)], 1)
        h = self.stem(x)
        gamma, beta = self.film(text).chunk(2, dim=1)
        h = self.head_conv(h * (1.0 + gamma[..., None, None]) + beta[..., None, None])
        return self.head(torch.cat([h.flatten(1), text], 1)).squeeze(1)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return torch.sigmoid(self.logits(images, prompts))


def save_shapes_scorer(scorer: ShapesScorer, out_dir: str | Path, name: str = DEFAULT_SCORER_NAME, meta: dict | None = None) -> Path:
    """Write ``{name}.safetensors`` and ``{name}.json`` (config + ``meta``); returns the weights path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / f"{name}.safetensors"
    save_file({k: v.detach().float().contiguous().cpu() for k, v in scorer.state_dict().items()}, str(weights))
    (out / f"{name}.json").write_text(json.dumps({"config": asdict(scorer.config), "meta": meta or {}}, indent=2) + "\n")
    return weights


def load_shapes_scorer(path: str | Path | None = None, device: str | torch.device = "cpu") -> ShapesScorer:
    """The shipped scorer (``leapalign/assets/shapes_scorer.*``) or one at ``path``; frozen, eval mode.

    Its parameters do not require grad, but gradients still flow to the images it scores.
    """
    p = Path(path) if path is not None else _ASSETS_DIR / f"{DEFAULT_SCORER_NAME}.safetensors"
    if p.is_dir():
        p = p / f"{DEFAULT_SCORER_NAME}.safetensors"
    weights, cfg_path = p.with_suffix(".safetensors"), p.with_suffix(".json")
    for f in (weights, cfg_path):
        if not f.is_file():
            raise FileNotFoundError(f"scorer file {f} not found (path={path!r}); train it with `python -m leapalign.shapes.scorer --train`")
    scorer = ShapesScorer(ScorerConfig(**json.loads(cfg_path.read_text())["config"]))
    scorer.load_state_dict(load_file(str(weights)), strict=True)
    return scorer.requires_grad_(False).eval().to(device)


def _pairs(n: int, g: torch.Generator) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """``n`` labelled pairs: 1/2 ground truth, 1/3 near misses, 1/6 renders of another prompt."""
    specs = sample_specs(n, g)
    n_pos, n_near = n // 2, n // 3
    shown = list(specs[:n_pos])
    shown += [corrupt_spec(s, g)[0] for s in specs[n_pos : n_pos + n_near]]
    shown += sample_specs(n - n_pos - n_near, g)  # mismatched: another random prompt's image
    images = render_batch(shown, g)
    labels = torch.zeros(n)
    labels[:n_pos] = 1.0
    # A "mismatched" draw can coincide with its prompt; label by the exact evaluator, never by hope.
    mism = slice(n_pos + n_near, n)
    labels[mism] = torch.tensor([float(j.correct) for j in evaluate(images[mism], specs[mism])])
    return images, [s.text for s in specs], labels


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
    p.add_argument("--out", type=Path, default=Path("leapalign/assets"), help="directory for the .safetensors and .json")
    p.add_argument("--name", default=DEFAULT_SCORER_NAME)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", type=Path, default=None, help="shapes model checkpoint to draw samples from (default: shipped)")
    p.add_argument("--model-samples", type=int, default=240, help="model samples labelled by the evaluator (0: none)")
    p.add_argument("--model-steps", type=int, default=16, help="Euler steps for those samples")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    return p


def _model_samples(path: Path | None, n: int, num_steps: int, seed: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    from leapalign.shapes.model import load_shapes_model  # the scorer itself never needs the image model

    model = load_shapes_model(path)
    prompts = [s.text for s in sample_specs(n, seed + 100)]
    g = torch.Generator().manual_seed(seed + 101)
    images = torch.cat([model.sample(prompts[i : i + 60], num_steps, g) for i in range(0, n, 60)])
    labels = torch.tensor([float(j.correct) for j in evaluate(images, prompts)])
    return images, prompts, labels


def main(argv: list[str] | None = None) -> int:
    """Train (``--train``) or evaluate the scorer. Returns a process exit code."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.train:
        print(json.dumps(ranking_accuracy(load_shapes_scorer(args.out / f"{args.name}.safetensors")), indent=2))
        return 0
    start = time.time()
    torch.manual_seed(args.seed)
    scorer = ShapesScorer()
    g = torch.Generator().manual_seed(args.seed + 1)
    extra = None
    if args.model_samples > 0:
        extra = _model_samples(args.model, args.model_samples, args.model_steps, args.seed)
        print(f"model samples: {args.model_samples}, evaluator-correct {float(extra[2].mean()):.3f} ({time.time() - start:.0f} s)")
    opt = torch.optim.AdamW(scorer.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    n_extra = args.batch_size // 8 if extra is not None else 0
    bar = tqdm(range(args.steps), desc="scorer", dynamic_ncols=True)
    recent: list[float] = []
    for step in bar:
        images, prompts, labels = _pairs(args.batch_size - n_extra, g)
        if n_extra:
            idx = torch.randint(extra[0].shape[0], (n_extra,), generator=g)
            images = torch.cat([images, extra[0][idx]])
            prompts = prompts + [extra[1][i] for i in idx.tolist()]
            labels = torch.cat([labels, extra[2][idx]])
        loss = F.binary_cross_entropy_with_logits(scorer.logits(images, prompts), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        recent = (recent + [float(loss.detach())])[-50:]
        if step % 10 == 0:
            bar.set_postfix(bce=f"{sum(recent) / len(recent):.4f}")
    scorer.eval()
    rank = ranking_accuracy(scorer)
    minutes = (time.time() - start) / 60
    print(f"trained in {minutes:.1f} min; held-out ranking: " + ", ".join(f"{k} {v:.3f}" for k, v in rank.items()))
    meta = {
        "command": "python -m leapalign.shapes.scorer " + shlex.join(sys.argv[1:] if argv is None else argv),
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "model_samples": args.model_samples,
        "train_minutes": round(minutes, 2),
        "final_bce": round(sum(recent) / len(recent), 5),
        "held_out_ranking": {k: round(v, 4) for k, v in rank.items()},
    }
    path = save_shapes_scorer(scorer, args.out, args.name, meta)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
