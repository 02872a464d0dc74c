"""Checkpoints: bit-identical kill/resume across processes, atomic writes under crashes and kills."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from leapalign.training.checkpoint_dir import latest_checkpoint, list_checkpoints, write_checkpoint
from leapalign.training.trainer import LeapAlignTrainer
from trainer_fixtures import save_tiny_flux_pipeline, tiny_config, tiny_flux_pipeline

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {f"w/{k}": v for k, v in load_file(str(ckpt / "trainable.safetensors")).items()}
    out.update({f"ema/{k}": v for k, v in load_file(str(ckpt / "ema.safetensors")).items()})
    optim = torch.load(ckpt / "optimizer.pt", weights_only=True)
    for idx, st in optim["state"].items():
        out.update({f"opt/{idx}/{k}": v for k, v in st.items()})
    return out


def test_killed_and_resumed_run_continues_bit_identically(tmp_path):
    """4 steps straight == 2 steps, save, a fresh process resumes and runs 2 more (weights, EMA, AdamW)."""
    from diffusers import FluxPipeline

    model_dir = save_tiny_flux_pipeline(tmp_path / "model")
    # dropout draws from the global RNG and warm-up makes the LR step-dependent: both must be restored
    common = dict(model_path=str(model_dir), lora_dropout=0.25, train_lr_warmup_steps=3, ckpt_save_final=True,
                  objective={"num_steps": 4, "hinge_lambda": None, "alpha": 0.3, "min_idx": 0})
    straight = LeapAlignTrainer(tiny_config(tmp_path / "a", train_num_steps=4, **common), FluxPipeline.from_pretrained(str(model_dir)))
    straight.train()
    cfg_b = tiny_config(tmp_path / "b", train_num_steps=2, **common)
    LeapAlignTrainer(cfg_b, FluxPipeline.from_pretrained(str(model_dir))).train()
    cfg_b.save_yaml(tmp_path / "b.yaml")
    proc = subprocess.run(
        [sys.executable, "-m", "leapalign", "train", str(tmp_path / "b.yaml"), "--train_num_steps", "4",
         "--ckpt_resume_from", "latest"],
        env=_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = _tensors(tmp_path / "a" / "checkpoints" / "step-00000004")
    b = _tensors(tmp_path / "b" / "checkpoints" / "step-00000004")
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the resumed steps logged the same losses as the uninterrupted ones
    lines_a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lines_b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines_b] == [1.0, 2.0, 3.0, 4.0]
    assert [x["loss"] for x in lines_a] == [x["loss"] for x in lines_b]
    assert json.loads((tmp_path / "b" / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())["step"] == 4


def test_crash_during_save_keeps_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    import safetensors.torch

    cfg = tiny_config(tmp_path / "run", train_num_steps=3, ckpt_keep_last=0)
    trainer = LeapAlignTrainer(cfg, tiny_flux_pipeline())
    trainer.training_step()
    first = trainer.save_checkpoint()
    saved = [p.detach().clone() for p in trainer.params]
    trainer.training_step()

    real = safetensors.torch.save_file

    def crash_midway(tensors, filename, *args, **kwargs):
        if str(filename).endswith("ema.safetensors"):  # trainable.safetensors is already on disk
            raise KeyboardInterrupt("simulated kill during save")
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint()
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert list_checkpoints(cfg.output_dir) == [first]
    assert latest_checkpoint(cfg.output_dir) == first
    assert not list((first.parent).glob(".tmp-*"))

    fresh = LeapAlignTrainer(cfg, tiny_flux_pipeline())
    fresh.load_checkpoint(latest_checkpoint(cfg.output_dir))
    assert fresh.step == 1
    assert all(torch.equal(a, p) for a, p in zip(saved, fresh.params))


def test_hard_kill_mid_write_never_exposes_a_partial_checkpoint(tmp_path):
    """os._exit inside the writer (no cleanup runs): the old checkpoint stays latest; the next save cleans up."""
    out = tmp_path / "out"
    write_checkpoint(out, 1, lambda d: (d / "trainer_state.json").write_text("{}"))
    script = textwrap.dedent(f"""
        import os
        from leapalign.training.checkpoint_dir import write_checkpoint
        def writer(d):
            (d / "trainable.safetensors").write_bytes(b"half")
            os._exit(9)
        write_checkpoint({str(out)!r}, 2, writer)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=_env(), timeout=120)
    assert proc.returncode == 9
    root = out / "checkpoints"
    assert [p.name for p in list_checkpoints(out)] == ["step-00000001"]
    assert latest_checkpoint(out) == root / "step-00000001"
    assert list(root.glob(".tmp-*"))  # the killed save's temporary is there, under a hidden name
    write_checkpoint(out, 3, lambda d: (d / "trainer_state.json").write_text("{}"))
    assert not list(root.glob(".tmp-*"))
    assert latest_checkpoint(out) == root / "step-00000003"
    # a stale pointer (checkpoint deleted by hand) falls back to the newest complete one
    import shutil

    shutil.rmtree(root / "step-00000003")
    assert latest_checkpoint(out) == root / "step-00000001"


def test_resume_rejects_a_checkpoint_of_another_setup(tmp_path):
    from leapalign.training.checkpoint_dir import CheckpointError

    cfg = tiny_config(tmp_path / "run", train_num_steps=1, ckpt_save_final=True)
    LeapAlignTrainer(cfg, tiny_flux_pipeline()).train()
    other = tiny_config(tmp_path / "run", lora_rank=2)
    with pytest.raises(CheckpointError, match="different trainable parameters"):
        LeapAlignTrainer(other, tiny_flux_pipeline()).load_checkpoint(latest_checkpoint(cfg.output_dir))


class _RunsCode:
    """A pickle payload that creates ``marker`` when unpickled (what a hostile checkpoint would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("planted", ["optimizer.pt", "scheduler.pt", "rng.pt"])
def test_resume_refuses_a_checkpoint_whose_pickle_would_run_code(tmp_path, planted):
    from leapalign.training.errors import CheckpointError

    cfg = tiny_config(tmp_path / "run", train_num_steps=1, ckpt_save_final=True, model_use_leapkernels=False)
    ckpt = LeapAlignTrainer(cfg, tiny_flux_pipeline()).train().checkpoint
    marker = tmp_path / "pwned"
    torch.save({"state": {}, "param_groups": [], "x": _RunsCode(marker)}, ckpt / planted)
    fresh = LeapAlignTrainer(cfg, tiny_flux_pipeline())
    with pytest.raises(CheckpointError, match=rf"refusing to load .*{planted}.*could run code"):
        fresh.load_checkpoint(ckpt)
    assert not marker.exists()  # the payload never ran
    assert fresh.step == 0


def test_every_checkpoint_file_loads_with_weights_only(tmp_path):
    """RNG states are tensors and plain data (numpy's and python's included), so resume never unpickles objects."""
    import random

    import numpy as np

    cfg = tiny_config(tmp_path / "run", train_num_steps=1, ckpt_save_final=True, model_use_leapkernels=False)
    ckpt = LeapAlignTrainer(cfg, tiny_flux_pipeline()).train().checkpoint
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        torch.load(ckpt / name, weights_only=True)
    from leapalign.training.checkpointing import capture_rng_state, restore_rng_state

    state = torch.load(ckpt / "rng.pt", weights_only=True)[0]
    restore_rng_state(state)
    draws = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(draws[0], again[0]) and (draws[1] == again[1]).all() and draws[2] == again[2]
    assert capture_rng_state()["numpy"]["keys"].dtype == torch.int64
