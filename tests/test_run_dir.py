"""One run per output folder: the OS lock, refusing/overwriting another run, run-scoped pruning and temp cleanup."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from leapalign.training.checkpoint_dir import latest_checkpoint, list_checkpoints, prune_checkpoints, write_checkpoint
from leapalign.training.errors import RunDirError
from leapalign.training.run_dir import LOCK_FILE, check_claimable, check_output_dir, claim_run_dir, truncate_metrics

ROOT = Path(__file__).resolve().parents[1]


def _holder(out: Path, ready: Path) -> subprocess.Popen:
    """Another process that claims ``out`` and sleeps holding it."""
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from leapalign.training.run_dir import claim_run_dir
        claim_run_dir({str(out)!r})
        Path({str(ready)!r}).touch()
        time.sleep(120)
    """)
    return subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ, PYTHONPATH=str(ROOT)))


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)


def test_a_held_folder_is_refused_with_the_holders_pid_and_sigkill_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "out"
    proc = _holder(out, tmp_path / "ready")
    try:
        _wait_for(tmp_path / "ready", proc)
        for attempt in (check_claimable, claim_run_dir):
            with pytest.raises(RunDirError, match=rf"output_dir='{out}' is in use by another run \(PID {proc.pid}\)"):
                attempt(out, resume_from="latest")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    claim = claim_run_dir(out, resume_from="latest")  # the kernel dropped the dead holder's lock
    assert (out / LOCK_FILE).read_text().strip() == str(os.getpid())
    again = claim_run_dir(out, resume_from="latest")  # re-entrant within one process (CLI, then train())
    assert again is claim and claim.holders == 2
    again.release()
    claim.release()


def _checkpoint(out: Path, step: int, run_id: str) -> Path:
    return write_checkpoint(out, step, lambda d: (d / "trainer_state.json").write_text(json.dumps({"run_id": run_id})), run_id=run_id)


def test_a_new_run_over_another_is_refused_unless_resumed_or_overwritten(tmp_path):
    out = tmp_path / "out"
    claim = claim_run_dir(out)
    _checkpoint(out, 60, claim.run_id)
    (out / "metrics.jsonl").write_text('{"step": 60}\n')
    claim.release()
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(RunDirError, match=r"already holds another run \(run \w+, last checkpoint step-00000060\).*--resume latest.*--overwrite"):
        claim_run_dir(out)
    assert sorted(p.name for p in out.rglob("*")) == before
    resumed = claim_run_dir(out, resume_from="latest")  # continuing keeps the run's id
    assert resumed.run_id == claim.run_id
    resumed.release()
    fresh = claim_run_dir(out, overwrite=True)
    assert fresh.run_id != claim.run_id
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("out.replaced-")]
    assert len(aside) == 1 and (aside[0] / "checkpoints" / "step-00000060").is_dir()  # moved, never deleted
    assert (aside[0] / "metrics.jsonl").read_text() == '{"step": 60}\n'
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE, "run.json"]
    fresh.release()


def test_pruning_and_temp_cleanup_touch_only_this_runs_files(tmp_path):
    out = tmp_path / "out"
    theirs = [_checkpoint(out, s, "theirs") for s in (50, 60)]
    stale = out / "checkpoints" / ".tmp-theirs-step-00000070-abcd1234"
    stale.mkdir()
    mine = [_checkpoint(out, s, "mine") for s in (5, 10, 15)]
    prune_checkpoints(out, keep_last=2, run_id="mine")
    assert list_checkpoints(out) == [mine[1], mine[2], *theirs]
    assert stale.is_dir()  # another run's save in progress is not "stale" for this run
    assert latest_checkpoint(out) == mine[2]


def test_latest_never_names_a_missing_folder(tmp_path):
    """Pruning keeps the checkpoint the pointer names (here an older one: a kill came between the
    rename of step 2 and the pointer update); a pointer to a folder that is gone falls back."""
    out = tmp_path / "out"
    first, second = _checkpoint(out, 1, "r"), _checkpoint(out, 2, "r")
    pointer = out / "checkpoints" / "latest"
    pointer.write_text("step-00000001\n")
    prune_checkpoints(out, keep_last=1, run_id="r")
    assert first.is_dir() and second.is_dir()
    assert (out / "checkpoints" / pointer.read_text().strip()).is_dir()
    pointer.write_text("step-00000009\n")  # deleted by hand
    assert latest_checkpoint(out) == second


def test_output_dir_checks_write_nothing(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="is an existing file, not a folder"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(RunDirError, match="cannot be created: .*file' is a file"):
        check_output_dir(tmp_path / "file" / "out")
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(RunDirError, match="cannot be created: .* is not writable"):
        check_output_dir(tmp_path / "new" / "out")
    with pytest.raises(RunDirError, match="is not writable"):
        check_output_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_truncate_metrics_keeps_the_steps_up_to_the_checkpoint(tmp_path):
    lines = [json.dumps({"step": s, "loss": 0.1 * s}) for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 5, "lo')  # the last line cut by a kill
    truncate_metrics(tmp_path, 2)
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
