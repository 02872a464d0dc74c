"""Scale-out on two CPU processes (torchrun, gloo): data-parallel and FSDP2 gradients equal one process."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dist_worker

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", "0", "--standalone", str(ROOT / "tests" / "dist_worker.py"), str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return torch.load(out / "dist_results.pt", weights_only=False), out


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tol) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=lambda m: f"{k}: {m}", **tol)


@pytest.mark.multiprocess
@pytest.mark.parametrize("key, mode, train_mode", [("ddp-lora", "none", "lora"), ("fsdp-full", "none", "full")])
def test_two_process_gradients_equal_one_process_on_the_same_global_batch(dist_results, key, mode, train_mode, tmp_path):
    results, _ = dist_results
    got = results[key]
    assert got["distributed"] == key.split("-")[0]
    ref = dist_worker.run(mode, train_mode, tmp_path)
    assert got["finite"] and ref["finite"]
    assert any(g.abs().sum() > 0 for g in ref["grads"].values())
    _close(got["grads"], ref["grads"], rtol=1e-4, atol=1e-7)
    # two AdamW steps later the weights still agree (every rank applied the same averaged gradient)
    _close(got["weights"], ref["weights"], rtol=1e-4, atol=1e-5)


@pytest.mark.multiprocess
def test_fsdp2_runs_a_leapalign_step_and_saves_a_gathered_checkpoint(dist_results):
    from safetensors.torch import load_file

    results, _ = dist_results
    got = results["fsdp-lora-leapalign"]
    assert got["distributed"] == "fsdp" and got["finite"] and got["metrics"]["skipped"] == 0.0
    ckpt = Path(got["checkpoint"])
    saved = load_file(str(ckpt / "trainable.safetensors"))
    _close(saved, got["weights"], rtol=0, atol=0)  # full (unsharded) tensors on disk
    assert (ckpt / "lora" / "pytorch_lora_weights.safetensors").is_file()
    # the EMA-weight sample grid ran on both ranks (sharded forwards are collective), rank 0 wrote it
    assert (ckpt.parents[1] / "samples" / "step-00000001.png").is_file()


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    """Two micro-batches of 2 accumulate to the gradient of one batch of 4 (loss / A per micro-batch)."""
    big = dist_worker.run("none", "lora", tmp_path, accumulation=1, train=False)
    acc = dist_worker.run("none", "lora", tmp_path, accumulation=2, train=False)
    assert any(g.abs().sum() > 0 for g in big["grads"].values())
    _close(acc["grads"], big["grads"], rtol=1e-4, atol=1e-7)


@pytest.mark.multiprocess
def test_fsdp2_full_finetune_exports_the_gathered_ema_transformer(dist_results):
    from safetensors.torch import load_file

    results, _ = dist_results
    ckpt = Path(results["fsdp-full"]["checkpoint"])
    exported = load_file(str(ckpt / "transformer" / "diffusion_pytorch_model.safetensors"))
    ema = load_file(str(ckpt / "ema.safetensors"))
    assert exported.keys() == ema.keys()  # every weight trains in a full fine-tune
    _close(exported, ema, rtol=0, atol=0)
    assert (ckpt / "transformer" / "config.json").is_file()


@pytest.mark.multiprocess
def test_fsdp2_resume_reshards_weights_ema_and_optimizer(dist_results):
    from safetensors.torch import load_file

    results, _ = dist_results
    first = results["fsdp-lora-leapalign"]
    ckpt = Path(first["checkpoint"])
    res = results["fsdp-resume"]
    assert res["loaded_step"] == 1 and res["step"] == 2 and res["metrics"]["skipped"] == 0.0
    _close(res["loaded"], first["weights"], rtol=0, atol=0)
    _close(res["loaded_ema"], load_file(str(ckpt / "ema.safetensors")), rtol=0, atol=0)
