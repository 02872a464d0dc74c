"""Real ``leapalign train`` processes killed with SIGKILL, and two runs racing for one folder.

One test, several processes at once (so it fits in well under a minute on 2 cores):

- the reference run ``ref`` trains 6 steps straight, but pauses inside step 3 holding its folder;
  meanwhile a second run into ``ref`` is refused (exit 2, one line naming the folder and the first
  run's PID) and writes nothing -- the first finishes untouched;
- the chain run is SIGKILLed (``LEAPALIGN_FAULT``, see :mod:`leapalign.training.faults`) in the
  middle of step 3, in the middle of saving step 4, and between renaming step 4 into place and
  moving the ``latest`` pointer; each time ``--resume latest`` continues. Its final checkpoint
  equals the reference bit for bit (weights, EMA, AdamW state) and its ``metrics.jsonl`` holds each
  step once with the reference's losses.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from trainer_fixtures import PROMPTS, save_tiny_flux_pipeline

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)
    env.pop("LEAPALIGN_FAULT", None)
    env.update(extra)
    return env


def _config(tmp_path: Path, model_dir: Path) -> Path:
    data = dict(
        seed=0, device="cpu", model_path=str(model_dir), model_dtype="float32", model_height=16, model_width=16,
        model_max_sequence_length=8, prompts=list(PROMPTS), reward_specs=[{"name": "brightness"}],
        model_use_leapkernels=False,  # the eager model: the kernels have their own tests, this is about faults
        objective={"num_steps": 3, "hinge_lambda": None, "min_idx": 0, "use_kernels": False}, train_num_steps=6, train_batch_size=2,
        train_learning_rate=1e-3, train_lr_warmup_steps=3, train_ema_decay=0.9, lora_rank=2, lora_dropout=0.25,
        ckpt_every=2, ckpt_keep_last=2,
    )
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _train(config: Path, out: Path, *args: str, fault: str | None = None, **popen) -> subprocess.Popen:
    env = _env(**({"LEAPALIGN_FAULT": fault} if fault else {}), **popen.pop("env", {}))
    return subprocess.Popen([sys.executable, "-m", "leapalign", "train", str(config), "--output_dir", str(out), *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _finish(proc: subprocess.Popen, expect: int) -> str:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == expect, err[-3000:]
    return err


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {f"w/{k}": v for k, v in load_file(str(ckpt / "trainable.safetensors")).items()}
    out.update({f"ema/{k}": v for k, v in load_file(str(ckpt / "ema.safetensors")).items()})
    for idx, st in torch.load(ckpt / "optimizer.pt", weights_only=True)["state"].items():
        out.update({f"opt/{idx}/{k}": v for k, v in st.items()})
    return out


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.multiprocess
def test_sigkill_at_each_fault_point_resumes_bit_identically_and_a_concurrent_run_is_refused(tmp_path):
    model_dir = save_tiny_flux_pipeline(tmp_path / "model")
    config = _config(tmp_path, model_dir)
    ref, chain, release = tmp_path / "ref", tmp_path / "chain", tmp_path / "release"
    first = _train(config, ref, fault="mid-step@3:pause", env={"LEAPALIGN_FAULT_RELEASE": str(release)})
    killed = _train(config, chain, fault="mid-step@3")

    deadline = time.monotonic() + 240
    while not release.with_name("release.waiting").exists():  # the first run holds ref/ and is inside step 3
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-3000:] if first.poll() else "timeout"
        time.sleep(0.1)
    before = sorted(str(p.relative_to(ref)) for p in ref.rglob("*"))
    second = _train(config, ref, "--seed", "1")
    err = _finish(second, 2)
    assert err.count("\n") == 1 and f"output_dir={str(ref)!r} is in use by another run (PID {first.pid})" in err, err
    assert sorted(str(p.relative_to(ref)) for p in ref.rglob("*")) == before  # the refused run wrote nothing
    release.touch()

    _, err = killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL, err[-3000:]
    assert [m["step"] for m in _metrics(chain)] == [1, 2]
    _finish(_train(config, chain, "--resume", "latest", fault="mid-save@4"), -signal.SIGKILL)
    assert list((chain / "checkpoints").glob(".tmp-*")), "the killed save left its temporary"
    assert (chain / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    _finish(_train(config, chain, "--resume", "latest", fault="before-pointer@4"), -signal.SIGKILL)
    assert (chain / "checkpoints" / "step-00000004" / "trainer_state.json").is_file()
    assert (chain / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    _finish(_train(config, chain, "--resume", "latest"), 0)
    _finish(first, 0)

    # the first run finished untouched by the refused one
    assert [m["step"] for m in _metrics(ref)] == [1, 2, 3, 4, 5, 6]
    assert yaml.safe_load((ref / "config.yaml").read_text())["seed"] == 0
    # the killed-and-resumed run equals the straight one, bit for bit, and logged each step once
    a, b = _tensors(ref / "checkpoints" / "step-00000006"), _tensors(chain / "checkpoints" / "step-00000006")
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [m["step"] for m in _metrics(chain)] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in _metrics(chain)] == [m["loss"] for m in _metrics(ref)]
    assert not list((chain / "checkpoints").glob(".tmp-*"))
    assert sorted(p.name for p in (chain / "checkpoints").iterdir()) == ["latest", "step-00000004", "step-00000006"]
