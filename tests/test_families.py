"""FLUX.2 and SD3 through the trainer, ``leapalign train`` / ``sample`` and their bad input (issue 17 items 4, 5).

Tiny pipelines built in code (:mod:`leapalign.adapters.tiny_configs`): FLUX.2 klein base (true CFG,
a Qwen3 deep enough for the pipeline's default text layers 9/18/27) and SD3.5 (CFG, dual attention,
CLIP x 2 + T5). Each trains two LoRA steps through :class:`LeapAlignTrainer` handed the *pipeline*,
so the family's adapter, prompt encoder and LoRA targets are the trainer's own choice; the saved
LoRA then loads into a fresh pipeline with its ``load_lora_weights`` and reproduces the EMA model.
"""
from __future__ import annotations

import pytest
import torch
import yaml

from _objective_oracles import single_torch_thread  # noqa: F401 (autouse fixture)
from leapalign.adapters import velocity_model_from_pipeline
from leapalign.adapters.families import FAMILIES, UnsupportedModelError, family_of_class, read_model_folder
from leapalign.adapters.tiny_configs import tiny_flux2_pipeline, tiny_sd3_pipeline

SIZE = 16  # pixels: 64 tokens for both tiny models (no VAE down-sampling, 2x2 packing / patches)
PROMPTS = ["a red cube", "two blue spheres", "a green cone"]
PIPELINES = {
    "flux2": lambda: tiny_flux2_pipeline("klein", pipeline_text_layers=True),
    "sd3": tiny_sd3_pipeline,
}
ADAPTERS = {"flux2": "Flux2VelocityModel", "sd3": "SD3VelocityModel"}


def _config(output_dir, **overrides):
    from leapalign.training.config import LeapAlignConfig

    base = dict(
        output_dir=str(output_dir), seed=0, device="cpu", model_dtype="float32", model_height=SIZE, model_width=SIZE,
        model_guidance=4.0, model_max_sequence_length=12, prompts=list(PROMPTS), objective_name="leapalign",
        objective={"num_steps": 3, "hinge_lambda": None, "alpha": 0.3}, reward_specs=[{"name": "brightness"}],
        train_num_steps=2, train_batch_size=2, train_learning_rate=1e-2, train_ema_decay=0.5, lora_rank=2,
        ckpt_every=0, ckpt_save_final=True, sample_every=0,
    )
    base.update(overrides)
    return LeapAlignConfig(**base)


def _lora_modules(net) -> set[str]:
    return {name for name, module in net.named_modules() if hasattr(module, "lora_A")}


@pytest.mark.parametrize("family", ["flux2", "sd3"])
def test_trainer_trains_each_family_from_its_pipeline_and_the_lora_loads_back(tmp_path, family, monkeypatch):
    import diffusers

    from leapalign.adapters.prompt_cache import AdapterPromptEncoder
    from leapalign.training.trainer import LeapAlignTrainer

    # the LoRA is written by the family's own pipeline class (its format), not FLUX.1's
    writers = []
    family_pipeline = getattr(diffusers, FAMILIES[family].pipelines[0])
    save = family_pipeline.save_lora_weights.__func__
    monkeypatch.setattr(family_pipeline, "save_lora_weights",
                        classmethod(lambda cls, *a, **kw: (writers.append(cls), save(cls, *a, **kw))[1]))
    pipe = PIPELINES[family]()
    trainer = LeapAlignTrainer(_config(tmp_path / "run"), pipe)
    assert type(trainer.model).__name__ == ADAPTERS[family] and trainer.model.do_cfg  # klein base / SD3: true CFG
    assert isinstance(trainer.prompt_encoder, AdapterPromptEncoder) and pipe.text_encoder is None  # encoded, released
    wrapped = _lora_modules(trainer.network)
    if family == "flux2":  # SwiGLU FF, fused single-block projections, each single block's to_out by name
        assert {"transformer_blocks.0.ff.linear_in", "transformer_blocks.0.attn.to_out.0",
                "single_transformer_blocks.0.attn.to_qkv_mlp_proj", "single_transformer_blocks.0.attn.to_out"} <= wrapped
    else:  # SD3.5's dual attention and both GELU feed-forwards
        assert {"transformer_blocks.0.attn2.to_q", "transformer_blocks.0.ff.net.2", "transformer_blocks.0.attn.to_add_out",
                "transformer_blocks.0.ff_context.net.0.proj"} <= wrapped
    base = {n: p.detach().clone() for n, p in trainer.network.named_parameters() if "lora" not in n}
    lora = {n: p.detach().clone() for n, p in trainer.network.named_parameters() if "lora_B" in n}
    result = trainer.train()
    assert result.step == 2 and result.skipped_steps == 0
    assert writers == [family_pipeline]
    assert all(torch.equal(p, base[n]) for n, p in trainer.network.named_parameters() if "lora" not in n)
    assert any(not torch.equal(p, lora[n]) for n, p in trainer.network.named_parameters() if "lora_B" in n)

    # the diffusers-format LoRA (EMA weights) loads into a fresh pipeline and gives the EMA model's velocity
    fresh = PIPELINES[family]()
    fresh.load_lora_weights(str(result.checkpoint / "lora"))
    loaded = velocity_model_from_pipeline(fresh, height=SIZE, width=SIZE, guidance=4.0, max_sequence_length=12)
    cond = trainer.prompt_encoder.encode(PROMPTS[:2])
    x = trainer.model.noise(2, torch.Generator().manual_seed(3))
    with torch.no_grad(), trainer.ema.swapped_in():
        expected = trainer.model.velocity(x, torch.tensor(0.6), cond)
    with torch.no_grad():
        got = loaded.velocity(x, torch.tensor(0.6), cond)
        plain = velocity_model_from_pipeline(PIPELINES[family](), height=SIZE, width=SIZE, guidance=4.0).velocity(
            x, torch.tensor(0.6), cond)
    assert (got - plain).abs().max() > 1e-5  # the LoRA changes the velocity
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)

    # and the resumable checkpoint restores the trained weights into a new trainer
    again = LeapAlignTrainer(_config(tmp_path / "run"), PIPELINES[family]())
    again.load_checkpoint(result.checkpoint)
    for (n, p), q in zip(trainer.network.named_parameters(), again.network.parameters()):
        assert torch.equal(p, q), n


def test_lora_targets_follow_the_family_unless_the_config_names_them():
    from leapalign.adapters.families import lora_target_modules
    from leapalign.adapters.tiny_configs import tiny_flux2_transformer, tiny_sd3_transformer
    from leapalign.models.tiny_flux import tiny_flux_transformer
    from leapalign.training.config import FLUX_LORA_TARGET_MODULES
    from leapalign.training.wiring import lora_targets

    cfg = _config("/tmp/unused")
    flux2, sd3 = tiny_flux2_transformer("klein", num_single_layers=2), tiny_sd3_transformer()
    assert lora_targets(cfg, tiny_flux_transformer("test")) == list(FLUX_LORA_TARGET_MODULES)
    assert set(FLUX_LORA_TARGET_MODULES) == set(FAMILIES["flux"].lora_targets)
    assert lora_targets(cfg, flux2)[-2:] == ["single_transformer_blocks.0.attn.to_out", "single_transformer_blocks.1.attn.to_out"]
    assert lora_targets(cfg, sd3) == lora_target_modules(FAMILIES["sd3"], sd3)
    assert lora_targets(_config("/tmp/unused", lora_target_modules=["attn.to_q"]), sd3) == ["attn.to_q"]


def test_family_of_a_model_folder_class_or_pipeline(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "model_index.json").write_text('{"_class_name": "Flux2KleinPipeline", "is_distilled": false}')
    folder = read_model_folder(tmp_path / "a")
    assert folder.family.name == "flux2" and folder.pipeline == "Flux2KleinPipeline"
    (tmp_path / "b" / "transformer").mkdir(parents=True)
    (tmp_path / "b" / "transformer" / "config.json").write_text('{"_class_name": "SD3Transformer2DModel"}')
    assert read_model_folder(tmp_path / "b").family.name == "sd3" and family_of_class("FluxPipeline").name == "flux"
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    with pytest.raises(UnsupportedModelError, match=r"holds a StableDiffusionXLPipeline .*supported pipelines: "
                                                    r"FluxPipeline \(FLUX.1\), Flux2Pipeline .*StableDiffusion3Pipeline"):
        read_model_folder(tmp_path / "c")
    with pytest.raises(UnsupportedModelError, match="no model_index.json or transformer/config.json"):
        read_model_folder(tmp_path)


def test_an_unsupported_pipeline_is_one_config_error_line():
    from diffusers import DiffusionPipeline

    from leapalign.training.errors import ConfigError
    from leapalign.training.wiring import adapter_from_pipeline

    class StableDiffusionXLPipeline(DiffusionPipeline):  # stands in for any pipeline we do not serve
        pass

    with pytest.raises(ConfigError, match=r"unsupported pipeline family: got StableDiffusionXLPipeline .*supported: "
                                          r"FluxPipeline .*Flux2KleinPipeline .*StableDiffusion3Pipeline"):
        adapter_from_pipeline(StableDiffusionXLPipeline(), _config("/tmp/unused"), torch.device("cpu"))


def test_leapkernels_auto_patches_every_family_and_refuses_other_networks():
    import leapkernels

    from leapalign.adapters.tiny_configs import tiny_flux2_transformer, tiny_sd3_transformer
    from leapalign.training.errors import ConfigError
    from leapalign.training.wiring import apply_leapkernels

    for net in (tiny_flux2_transformer("klein"), tiny_sd3_transformer()):
        assert apply_leapkernels(_config("/tmp/unused"), net) and leapkernels.is_patched(net)  # null = auto
        assert not apply_leapkernels(_config("/tmp/unused", model_use_leapkernels=False), torch.nn.Linear(2, 2))
    assert not apply_leapkernels(_config("/tmp/unused"), torch.nn.Linear(2, 2))  # auto leaves it eager
    with pytest.raises(ConfigError, match=r"no fused blocks for Linear; it patches FluxTransformer2DModel, "
                                          r"Flux2Transformer2DModel, SD3Transformer2DModel: set model_use_leapkernels: false"):
        apply_leapkernels(_config("/tmp/unused", model_use_leapkernels=True), torch.nn.Linear(2, 2))


# -- the command line -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for family, build in PIPELINES.items():
        build().save_pretrained(str(root / family))
        dirs[family] = root / family
    tiny_flux2_pipeline("klein").save_pretrained(str(root / "klein-2-layer-encoder"))  # 2 layers: no 9/18/27
    (root / "sdxl").mkdir()
    (root / "sdxl" / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    dirs.update(bad_text=root / "klein-2-layer-encoder", sdxl=root / "sdxl")
    return dirs


def _write(tmp_path, model_dir, **overrides):
    data = dict(output_dir=str(tmp_path / "out"), device="cpu", model_path=str(model_dir), model_dtype="float32",
                model_height=SIZE, model_width=SIZE, model_guidance=4.0, model_max_sequence_length=12,
                prompts=PROMPTS[:2], objective={"num_steps": 2, "hinge_lambda": None}, reward_specs=[{"name": "brightness"}],
                train_num_steps=1, train_batch_size=1, lora_rank=2, ckpt_every=0, ckpt_save_final=True)
    data.update(overrides)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("family, mode", [("flux2", "lora"), ("sd3", "lora"), ("sd3", "full")])
def test_cli_trains_and_samples_each_family(tmp_path, model_dirs, family, mode):
    from PIL import Image

    from leapalign import cli

    assert cli.main(["train", str(_write(tmp_path, model_dirs[family], train_mode=mode))]) == 0
    ckpt = tmp_path / "out" / "checkpoints" / "step-00000001"
    weights = "lora/pytorch_lora_weights.safetensors" if mode == "lora" else "transformer/diffusion_pytorch_model.safetensors"
    assert (ckpt / weights).is_file()
    assert cli.main(["sample", "--model_path", str(model_dirs[family]), "--checkpoint", str(ckpt), "--prompt", "a red cube",
                     "--output", str(tmp_path / "grid.png"), "--num_steps", "2", "--height", str(SIZE), "--width", str(SIZE),
                     "--dtype", "float32", "--max_sequence_length", "12", "--device", "cpu"]) == 0
    assert Image.open(tmp_path / "grid.png").size == (SIZE, SIZE)


@pytest.mark.parametrize("case, needle", [
    ("sdxl", "holds a StableDiffusionXLPipeline (model_index.json); supported pipelines: FluxPipeline (FLUX.1)"),
    ("bad_text", "Flux2KleinPipeline text encoder Qwen3ForCausalLM has 2 hidden layers but text_encoder_out_layers=(9, 18, 27)"),
])
def test_cli_refuses_a_model_it_cannot_serve_in_one_line_before_loading(tmp_path, model_dirs, capsys, case, needle):
    from leapalign import cli

    assert cli.main(["train", str(_write(tmp_path, model_dirs[case]))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "out").exists()
    assert cli.main(["sample", "--model_path", str(model_dirs["sdxl"]), "--prompt", "a", "--output", str(tmp_path / "g.png"),
                     "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "StableDiffusionXLPipeline" in err, err
