"""LeapAlignConfig: files, overrides, coercion and validation errors that name the field."""
from __future__ import annotations

import pytest

from leapalign.training.config import ConfigError, LeapAlignConfig, RewardSpec, apply_overrides


def test_defaults_follow_the_paper():
    c = LeapAlignConfig()
    assert (c.train_learning_rate, c.train_weight_decay, c.train_ema_decay) == (1e-5, 1e-4, 0.995)
    assert "attn.to_q" in c.lora_target_modules and "attn.to_out.0" in c.lora_target_modules


def test_yaml_and_toml_load_the_same_config(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "train_learning_rate: 3e-5\nprompts: [a cat]\nobjective: {alpha: 0.1, num_steps: 10}\n"
        "reward_specs:\n  - {name: pickscore, path: /m/pick, hinge: 0.4}\n"
    )
    (tmp_path / "c.toml").write_text(
        'train_learning_rate = 3e-5\nprompts = ["a cat"]\n[objective]\nalpha = 0.1\nnum_steps = 10\n'
        '[[reward_specs]]\nname = "pickscore"\npath = "/m/pick"\nhinge = 0.4\n'
    )
    a = LeapAlignConfig.from_file(tmp_path / "c.yaml")
    b = LeapAlignConfig.from_file(tmp_path / "c.toml")
    assert a == b
    assert a.train_learning_rate == 3e-5  # YAML reads "3e-5" as a string: coerced
    assert a.reward_specs == [RewardSpec(name="pickscore", path="/m/pick", hinge=0.4)]


def test_cli_overrides_scalar_nested_and_list(tmp_path):
    (tmp_path / "c.yaml").write_text("prompts: [a cat]\nobjective: {alpha: 0.1}\n")
    c = LeapAlignConfig.from_file(
        tmp_path / "c.yaml",
        ["--train_num_steps", "7", "--objective.tau=0.2", "--train-batch-size", "3", "--log_with", "tensorboard",
         "--reward_specs", "[{name: brightness, weight: 2}]", "--sample_use_ema", "false"],
    )
    assert c.train_num_steps == 7 and c.train_batch_size == 3
    assert c.objective == {"alpha": 0.1, "tau": 0.2}
    assert c.log_with == ["tensorboard"] and c.sample_use_ema is False
    assert c.reward_specs[0].weight == 2.0


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(train_batch_size=0), "train_batch_size"),
        (dict(train_learning_rate="fast"), "train_learning_rate"),
        (dict(mixed_precision="fp16"), "mixed_precision"),
        (dict(device="mps"), "device"),
        (dict(model_height=100), "model_height"),
        (dict(train_ema_decay=1.0), "train_ema_decay"),
        (dict(train_lr_scheduler="warmup_forever"), "train_lr_scheduler"),
        (dict(train_mode="qlora"), "train_mode"),
        (dict(train_num_steps=True), "train_num_steps"),
        (dict(reward_specs=[{"path": "/x"}]), "reward_specs[0]"),
        (dict(reward_specs=[{"name": "clip", "lambda": 1}]), "reward_specs[0]"),
        (dict(prompts=["ok", "  "]), "prompts[1]"),
        (dict(reward_specs=[{"name": "brightness"}, {"name": "pikscore"}]), "reward_specs[1].name"),
        (dict(objective_name="leapalgn"), "objective_name"),
        (dict(objective={"alpha": 2.0}), "alpha"),
    ],
)
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        LeapAlignConfig(**overrides)


def test_unknown_keys_suggest_the_closest_field(tmp_path):
    with pytest.raises(ConfigError, match="did you mean train_learning_rate"):
        LeapAlignConfig.from_dict({"train_learning_rat": 1e-4})
    with pytest.raises(ConfigError, match="unknown override --lora_rnk"):
        apply_overrides({}, ["--lora_rnk", "4"])
    with pytest.raises(ConfigError, match="needs a value"):
        apply_overrides({}, ["--lora_rank"])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        LeapAlignConfig.from_file(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        LeapAlignConfig.from_file(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        LeapAlignConfig.from_file(tmp_path / "list.yaml")
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"\.yaml, \.yml or \.toml"):
        LeapAlignConfig.from_file(tmp_path / "c.json")


def test_round_trip_through_yaml(tmp_path):
    c = LeapAlignConfig(prompts=["a"], reward_specs=[{"name": "clip", "path": "/p", "hinge": 0.3}], objective={"alpha": 0.2})
    c.save_yaml(tmp_path / "out.yaml")
    assert LeapAlignConfig.from_file(tmp_path / "out.yaml") == c
    assert all(h for _, _, h in LeapAlignConfig.field_help())  # every field documents itself


def test_example_configs_validate():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "configs"
    configs = sorted([*folder.glob("flux_*.yaml"), *folder.glob("flux2_*.yaml"), *folder.glob("sd35_*.yaml")])
    assert {"flux2_klein_lora_pickscore.yaml", "sd35_medium_lora_pickscore.yaml"} <= {p.name for p in configs}
    for path in configs:
        c = LeapAlignConfig.from_file(path)
        assert c.model_path and c.reward_specs and c.prompt_file
        from leapalign.objectives import build_objective

        build_objective(c.objective_name, **c.objective)


def test_family_configs_name_their_public_checkpoints_and_pipeline_settings():
    """FLUX.2-klein base and SD3.5-medium LoRA configs: the hub names (the planner's built-ins), CFG
    guidance and prompt lengths of their pipelines, LoRA targets left to the family's default."""
    from pathlib import Path

    from leapalign.training.config import FLUX_LORA_TARGET_MODULES
    from leapalign.training.plan_models import model_spec

    folder = Path(__file__).resolve().parents[1] / "configs"
    expected = {"flux2_klein_lora_pickscore.yaml": ("FLUX.2-klein-base-4B", "flux2", 4.0, 512),
                "sd35_medium_lora_pickscore.yaml": ("SD3.5-medium", "sd3", 4.5, 256)}
    for name, (model, family, guidance, length) in expected.items():
        c = LeapAlignConfig.from_file(folder / name)
        spec = model_spec(c.model_path, c.model_max_sequence_length)
        assert (spec.name, spec.family, c.model_guidance, c.model_max_sequence_length) == (model, family, guidance, length)
        assert c.train_mode == "lora" and c.lora_target_modules == FLUX_LORA_TARGET_MODULES  # left unset: the family's


def test_optional_field_error_says_null_is_allowed():
    """``model_use_leapkernels`` is true/false/null (auto); a bad value's error names all three."""
    assert LeapAlignConfig(prompts=["a"]).model_use_leapkernels is None
    with pytest.raises(ConfigError, match=r"model_use_leapkernels='auto' is invalid: expected true or false \(or null\)"):
        LeapAlignConfig(prompts=["a"], model_use_leapkernels="auto")


@pytest.mark.parametrize("family, guidance", [(None, 3.5), ("flux", 3.5), ("flux2", 4.0), ("sd3", 7.0)])
def test_guidance_left_null_is_the_family_pipeline_default(family, guidance):
    from leapalign.adapters.families import family_named
    from leapalign.training.wiring import adapter_kwargs

    fam = family_named(family) if family else None
    assert LeapAlignConfig().model_guidance is None
    assert adapter_kwargs(LeapAlignConfig(), fam)["guidance"] == guidance
    assert adapter_kwargs(LeapAlignConfig(model_guidance=2.0), fam)["guidance"] == 2.0
