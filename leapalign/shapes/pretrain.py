"""Flow-matching pretraining of the tiny shapes Flux model and its text encoder (jointly).

``python -m leapalign.shapes.pretrain --out DIR`` runs stage 1 of the shipped checkpoint; stage 2
continues it with ``--init DIR/shapes_flux.safetensors --seed 1 ...``. Both exact commands, their
wall times and the resulting accuracy are in ``leapalign/assets/README.md``.

Objective (rectified flow, DESIGN section 2): ``x_t = (1 - t) x0 + t eps``, the model regresses the
velocity ``eps - x0``; ``t`` is logit-normal(0, 1) (SD3), which puts most samples at mid noise
where prompt adherence is decided. Data are fresh ground-truth renders every step (the world is
procedural, so there is no fixed data set to overfit). AdamW with warmup and cosine decay, grad-norm
clip 1.0, and an EMA of the weights, which is what gets saved and evaluated.

At the end the EMA model samples the fixed evaluation prompts (Euler, ``--eval-steps``) and the
rule-based evaluator scores them; the per-category accuracy is written to the JSON next to the
weights.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from leapalign.shapes.assets import add_training_args, training_meta
from leapalign.shapes.evaluator import accuracy_by_category, evaluate
from leapalign.shapes.grid import save_image_grid
from leapalign.shapes.model import (
    DEFAULT_MODEL_NAME,
    ShapesModelConfig,
    ShapesVelocityModel,
    build_shapes_model,
    load_shapes_model,
    save_shapes_model,
)
from leapalign.shapes.world import eval_prompts, render_batch, sample_specs

__all__ = ["build_parser", "main", "evaluate_model"]


def build_parser(prog: str = "leapalign pretrain-toy") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    add_training_args(p, DEFAULT_MODEL_NAME, steps=900, batch_size=32, lr=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=50, help="linear warmup steps")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights")
    p.add_argument("--num-layers", type=int, default=2, help="Flux double-stream blocks")
    p.add_argument("--num-single-layers", type=int, default=2, help="Flux single-stream blocks")
    p.add_argument("--init", type=Path, default=None, help="continue from this checkpoint (its config wins over the size flags)")
    p.add_argument("--eval-n", type=int, default=240, help="evaluation prompts (balanced over categories)")
    p.add_argument("--eval-steps", type=int, default=16, help="Euler steps when sampling for evaluation")
    p.add_argument("--grid", type=Path, default=None, help="also write a PNG grid of 48 evaluation samples here")
    p.add_argument("--eval-only", action="store_true", help="only re-evaluate the checkpoint at --out/--name and update its JSON")
    return p


@torch.no_grad()
def evaluate_model(
    model: ShapesVelocityModel, n: int = 240, num_steps: int = 16, seed: int = 1234, batch_size: int = 60
) -> tuple[dict[str, float], torch.Tensor, list[str]]:
    """Rule-based accuracy of ``model`` on ``eval_prompts(n, seed)``; returns (accuracy, images, prompts)."""
    prompts = [s.text for s in eval_prompts(n, seed)]
    g = torch.Generator().manual_seed(seed)
    images = torch.cat([model.sample(prompts[i : i + batch_size], num_steps, g).cpu() for i in range(0, n, batch_size)])
    return accuracy_by_category(evaluate(images, prompts)), images, prompts


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def _eval_meta(args: argparse.Namespace, acc: dict[str, float]) -> dict:
    """``meta.eval`` of the checkpoint JSON: how the accuracy was measured, and the accuracy."""
    return {"n": args.eval_n, "euler_steps": args.eval_steps, "seed": 1234, "accuracy": {k: round(v, 4) for k, v in acc.items()}}


def _write_grid(path: Path | None, images: torch.Tensor, prompts: list[str]) -> None:
    """``--grid``: the first 48 evaluation samples as a PNG, their prompts in a .txt beside it."""
    if path is None:
        return
    save_image_grid(images[:48], path, nrow=8)
    path.with_suffix(".txt").write_text("\n".join(prompts[:48]) + "\n")


def _reevaluate(args: argparse.Namespace) -> int:
    """Score the saved checkpoint with the current evaluator; rewrite ``meta.eval`` in its JSON."""
    weights = args.out / f"{args.name}.safetensors"
    model = load_shapes_model(weights)
    acc, images, prompts = evaluate_model(model, args.eval_n, args.eval_steps)
    print("rule-based accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    cfg_path = weights.with_suffix(".json")
    data = json.loads(cfg_path.read_text())
    data["meta"]["eval"] = _eval_meta(args, acc)
    cfg_path.write_text(json.dumps(data, indent=2) + "\n")
    _write_grid(args.grid, images, prompts)
    return 0


def _train(model: ShapesVelocityModel, args: argparse.Namespace) -> list[float]:
    """Flow-matching training of ``model``'s trainable parameters on fresh renders; the EMA weights are
    copied in at the end. Returns the loss of every step."""
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, args.warmup, args.steps))
    ema = [p.detach().clone() for p in params]
    g_data = torch.Generator().manual_seed(args.seed + 1)
    g_noise = torch.Generator().manual_seed(args.seed + 2)
    losses: list[float] = []
    bar = tqdm(range(args.steps), desc=f"pretrain ({sum(p.numel() for p in params) / 1e6:.2f}M params)", dynamic_ncols=True)
    for step in bar:
        specs = sample_specs(args.batch_size, g_data)
        x0 = model.encode_images(render_batch(specs, g_data))
        eps = torch.randn(x0.shape, generator=g_noise)
        t = torch.sigmoid(torch.randn(x0.shape[0], generator=g_noise))
        xt = (1.0 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * eps
        cond = model.encode_prompts([s.text for s in specs])
        loss = (model.velocity(xt, t, cond) - (eps - x0)).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(args.ema, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p, 1.0 - decay)
        losses.append(float(loss.detach()))
        if step % 10 == 0 or step == args.steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    return losses


def main(argv: list[str] | None = None, prog: str = "leapalign pretrain-toy") -> int:
    """Pretrain, evaluate, save. Returns a process exit code. ``prog`` names the command in usage and
    errors: ``leapalign pretrain-toy`` (the CLI calls ``main(argv)``) or the module's own name."""
    args = build_parser(prog).parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.eval_only:
        return _reevaluate(args)
    previous = None
    if args.init is not None:
        model = load_shapes_model(args.init, train_text_encoder=True).train()
        previous = json.loads(Path(args.init).with_suffix(".json").read_text())["meta"]
    else:
        config = ShapesModelConfig(num_layers=args.num_layers, num_single_layers=args.num_single_layers)
        model = build_shapes_model(config, seed=args.seed, train_text_encoder=True).train()
    start = time.time()
    losses = _train(model, args)
    train_s = time.time() - start
    final_loss = sum(losses[-50:]) / len(losses[-50:])
    model.eval()
    t0 = time.time()
    acc, images, prompts = evaluate_model(model, args.eval_n, args.eval_steps)
    print(f"train {train_s / 60:.1f} min, eval {time.time() - t0:.0f} s, final loss (mean of last 50) {final_loss:.4f}")
    print("rule-based accuracy (EMA weights, " + f"{args.eval_n} prompts, {args.eval_steps} Euler steps): "
          + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    _write_grid(args.grid, images, prompts)
    if args.grid is not None:
        print(f"wrote {args.grid}")
    meta = training_meta("leapalign.shapes.pretrain", argv, args) | {
        "lr": args.lr,
        "ema": args.ema,
        "params": sum(p.numel() for p in model.trainable_parameters()),
        "train_minutes": round(train_s / 60, 2),
        "final_loss": round(final_loss, 5),
        "loss_curve": [round(sum(losses[i : i + 50]) / len(losses[i : i + 50]), 5) for i in range(0, len(losses), 50)],
        "init": str(args.init) if args.init is not None else None,
        "previous_stage": previous,
        "eval": _eval_meta(args, acc),
    }
    path = save_shapes_model(model, args.out, args.name, meta)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(prog="python -m leapalign.shapes.pretrain"))
