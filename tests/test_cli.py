"""The ``leapalign`` command: user errors exit != 0 with one clear line and write nothing."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from leapalign import cli
from trainer_fixtures import PROMPTS, save_tiny_flux_pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_flux_pipeline(tmp_path_factory.mktemp("model") / "tiny-flux")


def _write_config(tmp_path: Path, model_dir: Path, **overrides) -> Path:
    data = dict(
        output_dir=str(tmp_path / "out"), device="cpu", model_path=str(model_dir), model_dtype="float32",
        model_height=16, model_width=16, model_max_sequence_length=8, prompts=list(PROMPTS),
        objective={"num_steps": 3, "hinge_lambda": None}, reward_specs=[{"name": "brightness"}],
        train_num_steps=1, train_batch_size=1, lora_rank=2, ckpt_every=0,
    )
    data.update(overrides)
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _bad_cases(tmp_path: Path, model_dir: Path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "broken.json").write_text('["a cat", ')
    (tmp_path / "numbers.json").write_text("[1, 2]")
    (tmp_path / "malformed.yaml").write_text("train_num_steps: [1\n")
    return {
        "missing config": ([str(tmp_path / "nope.yaml")], "does not exist"),
        "malformed yaml": ([str(tmp_path / "malformed.yaml")], "not valid YAML"),
        "unknown key": ([str(_write_config(tmp_path, model_dir)), "--train_stepz", "3"], "unknown override"),
        "bad value": ([str(_write_config(tmp_path, model_dir)), "--train_batch_size", "0"], "train_batch_size"),
        "empty prompt file": ([str(_write_config(tmp_path, model_dir, prompt_file=str(tmp_path / "empty.txt")))], "holds no prompts"),
        "missing prompt file": ([str(_write_config(tmp_path, model_dir, prompt_file=str(tmp_path / "no.txt")))], "does not exist"),
        "broken json prompts": ([str(_write_config(tmp_path, model_dir, prompt_file=str(tmp_path / "broken.json")))], "not valid JSON"),
        "non-string prompts": ([str(_write_config(tmp_path, model_dir, prompt_file=str(tmp_path / "numbers.json")))], "non-empty string"),
        "unknown reward": ([str(_write_config(tmp_path, model_dir, reward_specs=[{"name": "pikscore"}]))], "unknown reward name"),
        "missing reward path": ([str(_write_config(tmp_path, model_dir, reward_specs=[{"name": "clip", "path": str(tmp_path / "x")}]))], "does not exist"),
        "unknown objective": ([str(_write_config(tmp_path, model_dir, objective_name="leapalgn"))], "unknown objective"),
        "bad objective option": ([str(_write_config(tmp_path, model_dir, objective={"alpah": 0.1}))], "alpah"),
        "unsupported device": ([str(_write_config(tmp_path, model_dir, device="tpu"))], "device"),
        "missing model": ([str(_write_config(tmp_path, model_dir, model_path=str(tmp_path / "no-model")))], "model_index.json"),
        "missing resume": ([str(_write_config(tmp_path, model_dir, ckpt_resume_from=str(tmp_path / "ck")))], "not a checkpoint"),
        # issue 12: every check before the model loads, types included
        "fractional int in the objective": ([str(_write_config(tmp_path, model_dir)), "--objective.num_steps", "2.5"],
                                            "objective.num_steps=2.5 is invalid: expected an integer"),
        "output_dir is a file": ([str(_write_config(tmp_path, model_dir, output_dir=str(tmp_path / "afile")))], "is an existing file"),
        "output_dir under a file": ([str(_write_config(tmp_path, model_dir, output_dir=str(tmp_path / "afile" / "out")))], "cannot be created"),
        "reward module that does not import": ([str(_write_config(tmp_path, model_dir, reward_specs=[{"name": "no_such_module_xyz:score"}]))],
                                               "cannot import 'score' from 'no_such_module_xyz'"),
        "reward that cannot be constructed": ([str(_write_config(tmp_path, model_dir, reward_specs=[
            {"name": "trainer_fixtures:broken_reward_factory", "path": str(tmp_path)}]))], "cannot open the reward model"),
        "reward without a gradient": ([str(_write_config(tmp_path, model_dir, reward_specs=[{"name": "trainer_fixtures:detached_reward"}]))],
                                      "without a gradient path to the images"),
    }


def test_train_user_errors_exit_2_and_write_nothing(tmp_path, model_dir, capsys, monkeypatch):
    (tmp_path / "afile").write_text("not a folder")
    cases = _bad_cases(tmp_path, model_dir)
    if not __import__("torch").cuda.is_available():
        cases["cuda without a GPU"] = ([str(_write_config(tmp_path, model_dir, device="cuda"))], "no CUDA device")

    def no_model_loads(*args, **kwargs):
        raise AssertionError("a model was loaded before the checks")

    import diffusers

    monkeypatch.setattr(diffusers.FluxPipeline, "from_pretrained", no_model_loads)
    for name, (args, message) in cases.items():
        code = cli.main(["train", *args])
        err = capsys.readouterr().err
        last = err.rstrip().splitlines()[-1]
        assert code == 2, (name, err)
        assert last.startswith("leapalign train: error: ") and message in last, (name, err)  # one line says it all
        assert not (tmp_path / "out").exists(), name
    assert (tmp_path / "afile").read_text() == "not a folder"


def test_train_user_errors_found_after_loading_still_exit_2(tmp_path, model_dir, capsys):
    """LoRA targets can only be checked against the loaded model: still one line, exit 2, nothing written."""
    config = _write_config(tmp_path, model_dir, lora_target_modules=["to_nothing"])
    assert cli.main(["train", str(config)]) == 2
    assert "lora_target_modules" in capsys.readouterr().err.rstrip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


def _metric_steps(out: Path) -> list[float]:
    import json

    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_second_run_into_a_used_folder_is_refused_unless_resumed_or_overwritten(tmp_path, model_dir, capsys):
    """Issue 12's probe 1: a new run into a folder holding a finished run no longer destroys its work."""
    out = tmp_path / "out"
    config = str(_write_config(tmp_path, model_dir, ckpt_every=2, ckpt_keep_last=1, model_use_leapkernels=False,
                               objective={"num_steps": 2, "hinge_lambda": None, "use_kernels": False}))
    assert cli.main(["train", config, "--train_num_steps", "4"]) == 0
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert cli.main(["train", config, "--train_num_steps", "2", "--seed", "1"]) == 2
    last = capsys.readouterr().err.rstrip().splitlines()[-1]
    assert "already holds another run" in last and "last checkpoint step-00000004" in last and "--overwrite" in last
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    assert cli.main(["train", config, "--train_num_steps", "2", "--overwrite"]) == 0
    assert "checkpoint: " + str(out / "checkpoints" / "step-00000002") in capsys.readouterr().err
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("out.replaced-")]
    assert _metric_steps(aside) == [1, 2, 3, 4] and (aside / "checkpoints" / "step-00000004").is_dir()
    assert _metric_steps(out) == [1, 2]
    assert yaml.safe_load((out / "config.yaml").read_text())["overwrite"] is False  # rerunning it never moves the run
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-00000002"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000002"

    assert cli.main(["train", config, "--train_num_steps", "3", "--resume", "latest"]) == 0
    assert _metric_steps(out) == [1, 2, 3]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000003"


def test_sample_user_errors(tmp_path, model_dir, capsys):
    out = tmp_path / "s.png"
    for args, message in [
        (["--model_path", str(model_dir), "--output", str(out)], "no prompts"),
        (["--model_path", str(tmp_path), "--prompt", "a cat", "--output", str(out)], "model_index.json"),
        (["--model_path", str(model_dir), "--prompt", "a cat", "--output", str(tmp_path / "s.jpg")], ".png"),
        (["--model_path", str(model_dir), "--prompt", "a", "--output", str(out), "--device", "mps"], "not supported"),
        (["--model_path", str(model_dir), "--prompt", "a", "--output", str(out), "--checkpoint", str(tmp_path)], "lora/"),
    ]:
        assert cli.main(["sample", *args]) == 2, args
        assert message in capsys.readouterr().err
        assert not out.exists()


def test_sample_reads_only_safetensors_from_a_checkpoint(tmp_path, model_dir, capsys):
    """A checkpoint whose LoRA is a pickle (that would run code) is refused by name; the code never runs."""
    import torch

    class RunsCode:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    (tmp_path / "ckpt" / "lora").mkdir(parents=True)
    torch.save({"x": RunsCode()}, tmp_path / "ckpt" / "lora" / "pytorch_lora_weights.bin")
    args = ["--model_path", str(model_dir), "--checkpoint", str(tmp_path / "ckpt"), "--prompt", "a", "--output", str(tmp_path / "s.png")]
    assert cli.main(["sample", *args]) == 2
    assert "only safetensors weights are read" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "s.png").exists()


def test_unknown_command_and_missing_optional_modules(capsys, monkeypatch):
    assert cli.main(["trian"]) == 2
    assert "unknown command" in capsys.readouterr().err
    monkeypatch.setitem(cli._DISPATCH, "demo", ("leapalign.shapes.no_such_demo", "main"))
    assert cli.main(["demo"]) == 2
    assert "not available" in capsys.readouterr().err
    assert cli.main([]) == 2
    assert cli.main(["train", "--help"]) == 0
    assert "--train_learning_rate" in capsys.readouterr().out


def test_dispatch_passes_argv_and_exit_code(monkeypatch):
    import types

    seen = {}
    fake = types.ModuleType("fake_demo")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 3
    monkeypatch.setitem(sys.modules, "fake_demo", fake)
    monkeypatch.setitem(cli._DISPATCH, "demo", ("fake_demo", "main"))
    assert cli.main(["demo", "--quick", "--json", "x"]) == 3
    assert seen["argv"] == ["--quick", "--json", "x"]


def test_bench_is_gone_and_says_where_the_benchmarks_are(capsys):
    """``benchmarks`` is not installed: ``leapalign bench`` is an unknown command pointing at ``python -m benchmarks``."""
    assert cli.main(["bench", "memory"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'bench'" in err and "python -m benchmarks" in err
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "bench [ARGS]" not in out and "python -m benchmarks" in out


def test_version(capsys):
    from leapalign import __version__

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"leapalign {__version__}"


def test_console_entry_trains_then_samples_from_the_checkpoint(tmp_path, model_dir):
    """``python -m leapalign train`` end to end, then ``sample`` with the saved LoRA; a bad run exits 2."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    config = _write_config(tmp_path, model_dir, ckpt_save_final=True)
    proc = subprocess.run([sys.executable, "-m", "leapalign", "train", str(config), "--train_num_steps", "2"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp_path / "out" / "checkpoints" / "step-00000002"
    assert (ckpt / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert cli.main(["sample", "--model_path", str(model_dir), "--checkpoint", str(ckpt), "--prompt", "a red cat",
                     "--prompt", "a blue dog", "--output", str(tmp_path / "grid.png"), "--num_steps", "3",
                     "--height", "16", "--width", "16", "--dtype", "float32", "--max_sequence_length", "8",
                     "--device", "cpu"]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size == (32, 16)


def test_plan_is_a_command_and_bad_input_is_one_line(tmp_path, capsys):
    """``leapalign plan`` is served by leapalign.training.plan; an unknown GPU or world size is exit 2."""
    assert cli.main(["--help"]) == 0
    assert "plan CONFIG.yaml" in capsys.readouterr().out
    config = tmp_path / "c.yaml"
    config.write_text("train_mode: lora\n")
    for extra, needle in ((["--gpu", "NOPE"], "unknown GPU"), (["--world-size", "0"], "world_size=0")):
        assert cli.main(["plan", str(config), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err


def test_sample_compile_wraps_the_model_in_the_rollout_engine(tmp_path, model_dir, monkeypatch):
    """``leapalign sample --compile default`` samples through ``wrap_rollout`` (off: the model itself)."""
    import leapalign.rollout_engine as engine

    seen = []
    monkeypatch.setattr(engine, "wrap_rollout", lambda model, config: seen.append(config.compile) or model)
    base = ["--model_path", str(model_dir), "--prompt", "a", "--num_steps", "2", "--height", "16", "--width", "16",
            "--dtype", "float32", "--device", "cpu"]
    assert cli.main(["sample", *base, "--output", str(tmp_path / "off.png")]) == 0 and seen == []
    assert cli.main(["sample", *base, "--compile", "default", "--output", str(tmp_path / "on.png")]) == 0
    assert seen == ["default"] and (tmp_path / "on.png").is_file()
