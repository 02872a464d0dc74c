"""Rewards: differentiable preprocessing, CLIP/PickScore from a local tiny CLIPModel, registry, hinges."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from leapalign.rewards import CompositeReward, RewardTerm, UnknownRewardError, build_reward, call_reward
from leapalign.rewards.preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess


def _tiny_clip_dir(tmp_path):
    """A tiny random CLIPModel + word-level tokenizer saved to ``tmp_path`` (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<s>", "</s>", "a", "red", "blue", "cat", "dog", "photo", "of"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=12, eos_token_id=3, pad_token_id=0, bos_token_id=2),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=30, patch_size=10),
        projection_dim=8,
    )
    model = CLIPModel(config)
    path = tmp_path / "tiny-clip"
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def test_preprocess_matches_clip_image_processor_and_keeps_gradient():
    """Same numbers as transformers' PIL-based CLIPImageProcessor (up to resampler differences)."""
    from transformers import CLIPImageProcessor

    torch.manual_seed(0)
    # a smooth image so PIL's and torch's bicubic kernels agree closely; non-square to test the crop
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 48), torch.linspace(0, 1, 80), indexing="ij")
    img = torch.stack([xx, yy, (xx * yy) ** 0.5]).unsqueeze(0)
    img = img.clone().requires_grad_(True)
    ours = clip_preprocess(img, 24)
    proc = CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24},
                              image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=False)
    pil = proc(images=[(img[0].detach().permute(1, 2, 0).numpy() * 255).round().astype("uint8")],
               return_tensors="pt")["pixel_values"]
    assert ours.shape == pil.shape == (1, 3, 24, 24)
    assert (ours.detach() - pil).abs().mean() < 0.03, (ours.detach() - pil).abs().mean()
    ours.sum().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0


def test_preprocess_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        clip_preprocess(torch.zeros(2, 4, 8, 8), 8)


def test_clip_and_pickscore_match_clipmodel_and_are_differentiable(tmp_path):
    from transformers import AutoTokenizer, CLIPModel

    path = _tiny_clip_dir(tmp_path)
    reward = build_reward("clip", path=str(path))
    prompts = ["a red cat", "photo of a blue dog"]
    images = torch.rand(2, 3, 40, 30, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    scores = call_reward(reward, images, prompts)
    assert scores.shape == (2,)
    # reference through CLIPModel.forward: logits_per_image = logit_scale * cos
    model = CLIPModel.from_pretrained(str(path))
    tok = AutoTokenizer.from_pretrained(str(path))(prompts, padding="max_length", max_length=12, return_tensors="pt")
    out = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                pixel_values=clip_preprocess(images.detach(), 30))
    ref = out.logits_per_image.diagonal() / model.logit_scale.exp()
    torch.testing.assert_close(scores.detach(), ref.detach(), rtol=1e-5, atol=1e-5)
    scores.sum().backward()
    assert images.grad.abs().sum() > 0
    pick = build_reward("pickscore", path=str(path))
    torch.testing.assert_close(pick(images.detach(), prompts), scores.detach() * model.logit_scale.exp().item(),
                               rtol=1e-5, atol=1e-5)


def test_model_rewards_need_a_local_path(tmp_path):
    with pytest.raises(ValueError, match="needs path"):
        build_reward("clip")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        build_reward("pickscore", path=str(tmp_path / "missing"))


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is not None, reason="open_clip installed")
def test_hps_without_open_clip_says_how_to_install(tmp_path):
    with pytest.raises(ImportError, match="open_clip"):
        build_reward("hps", path=str(tmp_path / "hps.pt"))


def test_registry_unknown_and_user_callables():
    with pytest.raises(UnknownRewardError, match="unknown reward name='pikscore'"):
        build_reward("pikscore")
    with pytest.raises(UnknownRewardError, match="cannot import"):
        build_reward("leapalign.rewards.simple:nope")
    fn = build_reward("leapalign.rewards.simple:brightness_reward")
    x = torch.full((2, 3, 4, 4), 0.25)
    torch.testing.assert_close(fn(x, ["a", "b"]), torch.full((2,), 0.25))


def test_composite_hinge_is_exact_per_term_hinge():
    """relu(Lambda - R) == sum_i w_i relu(lambda_i - r_i) for any values."""
    torch.manual_seed(0)
    r1, r2 = torch.randn(64), torch.randn(64) * 3
    comp = CompositeReward([RewardTerm("a", lambda x, p: r1, 0.7, 0.2), RewardTerm("b", lambda x, p: r2, 1.5, -0.5)])
    R = comp(torch.zeros(64, 3, 2, 2), ["p"] * 64)
    expected = 0.7 * torch.relu(0.2 - r1) + 1.5 * torch.relu(-0.5 - r2)
    torch.testing.assert_close(torch.relu(comp.hinge - R), expected)
    assert set(comp.last_components) == {"reward/a", "reward/b"}
    assert CompositeReward([RewardTerm("a", lambda x, p: r1)]).hinge is None


def test_hps_wrapper_against_a_stand_in_open_clip(tmp_path, monkeypatch):
    """HPSv2Reward's own logic (checkpoint loading, torch preprocessing, cosine, text cache) with a
    tiny stand-in for open_clip's ViT-H-14, since the real package and weights are not available."""
    import sys
    import types

    class TinyClip(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = torch.nn.Linear(3 * 8 * 8, 4)
            self.visual.image_size = (8, 8)
            self.text = torch.nn.Embedding(10, 4)

        def encode_image(self, pixels):
            return self.visual(pixels.flatten(1))

        def encode_text(self, ids):
            return self.text(ids).sum(1)

    fake = types.ModuleType("open_clip")
    fake.create_model = lambda arch, pretrained=None, precision="fp32": TinyClip()
    fake.get_tokenizer = lambda arch: (lambda texts: torch.tensor([[len(t) % 10, 1] for t in texts]))
    monkeypatch.setitem(sys.modules, "open_clip", fake)
    torch.manual_seed(0)
    ref = TinyClip()
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "hps.pt")
    reward = build_reward("hps", path=str(tmp_path / "hps.pt"))
    images = torch.rand(2, 3, 16, 12, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    prompts = ["a cat", "two dogs"]
    scores = call_reward(reward, images, prompts)
    img = ref.encode_image(clip_preprocess(images.detach(), 8))
    txt = ref.encode_text(fake.get_tokenizer("x")(prompts))
    expected = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    torch.testing.assert_close(scores.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    scores.sum().backward()
    assert images.grad.abs().sum() > 0
