"""The SD3 family on the tiny SD3.5-style pipeline: detection from its files, the pipeline's own prompt encoding,
sampling that reproduces `StableDiffusion3Pipeline`, and the LRM backbone's truncated forward against the stock
transformer."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lpo.reward.backbones import family_of, load_generator
from lpo.reward.backbones.mmdit import SD3LRMBackbone, encode_sd3_prompts
from lpo.reward.lpo.sampler import sample
from lpo.reward.lrm.model import LatentRewardModel

PROMPTS = ["a red circle", "a blue square on green"]


@pytest.fixture(scope="module")
def sd3(tiny_models_dir: Path) -> str:
    return str(tiny_models_dir / "sd3")


@pytest.fixture(scope="module")
def sd3_without_t5(sd3: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The same pipeline saved without T5 (diffusers then feeds zeros in its place)."""
    from diffusers import StableDiffusion3Pipeline

    out = tmp_path_factory.mktemp("sd3-no-t5") / "sd3"
    pipeline = StableDiffusion3Pipeline.from_pretrained(sd3, text_encoder_3=None, tokenizer_3=None)
    pipeline.save_pretrained(out)
    return str(out)


def test_the_family_is_read_from_the_transformer_config(sd3: str, sd3_without_t5: str) -> None:
    assert family_of(sd3).name == "sd3" and family_of(sd3_without_t5).name == "sd3"
    assert family_of(sd3).denoiser == "transformer" and family_of(sd3).flow_matching


@pytest.mark.parametrize("t5", [True, False])
def test_lrm_prompt_encoding_equals_the_pipelines(t5: bool, sd3: str, sd3_without_t5: str) -> None:
    base = sd3 if t5 else sd3_without_t5
    pipeline = family_of(base).load_pipeline(base)  # passes the absent T5 as None, as diffusers needs
    backbone = LatentRewardModel.from_base(base).backbone
    assert ("text_encoder_3" in backbone.encoder_names) == t5
    with torch.no_grad():
        context, pooled = pipeline.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False)[::2]
        ours = encode_sd3_prompts(backbone.tokenizers, backbone.encoders, PROMPTS,
                                  pipeline.transformer.config.joint_attention_dim, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(ours[0], context)
    torch.testing.assert_close(ours[1], pooled)


def test_sampling_at_noise_level_zero_reproduces_the_pipeline(sd3: str) -> None:
    """Our grid, conditioning, CFG and step (a = 0) give the pipeline's own latents for the same noise."""
    from diffusers import StableDiffusion3Pipeline

    pipeline = StableDiffusion3Pipeline.from_pretrained(sd3)
    pipeline.set_progress_bar_config(disable=True)
    expected = pipeline(PROMPTS[0], num_inference_steps=4, guidance_scale=4.5, output_type="latent",
                        generator=torch.Generator().manual_seed(7)).images
    model = load_generator(sd3)
    ours = sample(model, model.encode_prompts(PROMPTS[:1]), [torch.Generator().manual_seed(7)], steps=4,
                  guidance=4.5, eta=0.0)["latents"]
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    assert model.timesteps(4) == pipeline.scheduler.timesteps.tolist()


def test_truncated_lrm_equals_the_stock_transformer_up_to_its_depth(sd3: str) -> None:
    from diffusers import SD3Transformer2DModel

    stock = SD3Transformer2DModel.from_pretrained(sd3, subfolder="transformer").eval()
    layers = stock.config.num_layers
    lrm = LatentRewardModel.from_base(sd3).eval()
    backbone = lrm.backbone
    assert backbone.depth == SD3LRMBackbone.default_depth(stock.config) == 3 and lrm.config.taps == [1, 2]
    assert len(backbone.transformer.transformer_blocks) == 3 and backbone.transformer.proj_out is None
    captured: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(lambda m, i, o: captured.append(o[1])) for block in stock.transformer_blocks]
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, *lrm.config.latent_shape, generator=generator)
    timesteps = torch.tensor([960.1, 150.0])
    with torch.no_grad():
        text = lrm.encode_text(PROMPTS)
        stock(hidden_states=latents, encoder_hidden_states=text["context"], pooled_projections=text["pooled"],
              timestep=timesteps)
        ours = backbone.block_outputs(latents, timesteps, text)
    for hook in hooks:
        hook.remove()
    assert len(ours) == 3 and len(captured) == layers
    for mine, theirs in zip(ours, captured):
        torch.testing.assert_close(mine, theirs)
    # the blocks after the depth are neither built nor saved
    keys = lrm.state_dict().keys()
    assert any(k.startswith("backbone.transformer.transformer_blocks.2.") for k in keys)
    assert not any(k.startswith("backbone.transformer.transformer_blocks.3.") for k in keys)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_score_is_the_scaled_cosine_with_vfe_on_the_deepest_feature(family: str, tiny_models_dir: Path) -> None:
    lrm = LatentRewardModel.from_base(str(tiny_models_dir / family), text_projection_init=None).eval()
    latents = torch.randn(2, *lrm.config.latent_shape, generator=torch.Generator().manual_seed(1))
    timesteps = torch.tensor([8.9, 602.2])
    with torch.no_grad():
        scores = lrm.score(latents, timesteps, PROMPTS)
        # VFE on the deepest feature, the taps from the conditional branch; score = exp(logit_scale) * cos
        text, empty = lrm.encode_text(PROMPTS), lrm.encode_text([""] * 2)
        cond = lrm.backbone.pooled_features(latents, timesteps, text, lrm.feature_taps)
        uncond = lrm.backbone.pooled_features(latents, timesteps, empty, lrm.feature_taps)
        g = lrm.config.vfe_scale
        feats = cond[:-1] + [uncond[-1] + g * (cond[-1] - uncond[-1])]
        visual = lrm.visual_projection(torch.cat(feats, dim=-1))
        expected = math.exp(lrm.logit_scale.item()) * torch.nn.functional.cosine_similarity(visual, text["text"])
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    assert len(feats) == len(lrm.config.taps) + 1 and lrm.config.vfe_scale == 7.5


def test_lrm_score_save_load_and_frozen_text(sd3: str, tmp_path: Path) -> None:
    lrm = LatentRewardModel.from_base(sd3, depth=4).eval()
    assert lrm.backbone.depth == 4 and len(lrm.backbone.transformer.transformer_blocks) == 4
    clip_l, clip_g = lrm.backbone.encoders[:2]
    first = clip_l.config.projection_dim
    # the text projection starts as the identity on CLIP-G's half of the pooled vector
    weight = lrm.text_projection.weight
    assert weight.shape == (clip_g.config.projection_dim, lrm.backbone.text_width)
    torch.testing.assert_close(weight[:, first:], torch.eye(weight.shape[0]))
    assert torch.all(weight[:, :first] == 0)
    assert not any(p.requires_grad for encoder in lrm.backbone.encoders for p in encoder.parameters())
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, *lrm.config.latent_shape, generator=generator)
    timesteps = torch.tensor([8.9, 602.2])
    with torch.no_grad():
        scores = lrm.score(latents, timesteps, PROMPTS)
    lrm.save_pretrained(tmp_path / "lrm")
    # the frozen text encoders are the base's: neither module parameters nor saved
    saved = load_file(tmp_path / "lrm" / "diffusion_pytorch_model.safetensors")
    assert not any("text_encoder" in k for k in saved) and not any("text_encoder" in k for k in lrm.state_dict())
    loaded = LatentRewardModel.from_pretrained(tmp_path / "lrm")
    assert loaded.backbone.depth == 4 and loaded.config.vae_shift_factor == pytest.approx(0.0609)
    with torch.no_grad():
        torch.testing.assert_close(loaded.score(latents, timesteps, PROMPTS), scores)
    # frozen text encoders: the empty prompt is encoded once even while training
    lrm.train()
    calls = []
    real = lrm.encode_text
    lrm.encode_text = lambda p: calls.append(list(p)) or real(p)
    lrm.score(latents, timesteps, PROMPTS)
    lrm.score(latents, timesteps, PROMPTS)
    assert calls.count([""]) == 1


def test_a_step_changes_the_transformer_and_projections_not_the_text_encoders(sd3: str) -> None:
    lrm = LatentRewardModel.from_base(sd3).train()
    before = {k: v.clone() for k, v in lrm.state_dict().items()}
    encoders = [{k: v.clone() for k, v in encoder.state_dict().items()} for encoder in lrm.backbone.encoders]
    optimizer = torch.optim.AdamW([p for p in lrm.parameters() if p.requires_grad], lr=1e-2)
    latents = torch.randn(2, *lrm.config.latent_shape, generator=torch.Generator().manual_seed(2))
    loss = -lrm.score(latents, torch.tensor([300.0, 700.0]), PROMPTS).sum()
    loss.backward()
    optimizer.step()
    after = lrm.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("backbone.transformer.transformer_blocks.0.") for k in changed)
    assert {"visual_projection.weight", "text_projection.weight", "logit_scale"} <= changed
    for encoder, saved in zip(lrm.backbone.encoders, encoders):
        assert all(torch.equal(v, saved[k]) for k, v in encoder.state_dict().items())


def test_a_pipeline_without_a_transformer_config_is_refused(tmp_path: Path, sd3: str) -> None:
    from lpo.core.errors import InputError

    shutil.copytree(sd3, tmp_path / "broken")
    (tmp_path / "broken" / "transformer" / "config.json").unlink()
    with pytest.raises(InputError, match="transformer/config.json"):
        family_of(str(tmp_path / "broken"))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_frozen_text_encoders_can_run_in_half_precision_beside_a_float32_model(family: str,
                                                                              tiny_models_dir: Path) -> None:
    """The trainer loads the frozen encoders in its half precision (T5-XXL: 9.5 GB instead of 19); the trained
    parts stay float32 and get float32 conditioning, close to the all-float32 model's."""
    base = str(tiny_models_dir / family)
    torch.manual_seed(0)
    full = LatentRewardModel.from_base(base, text_projection_init=None).eval()
    torch.manual_seed(0)
    half = LatentRewardModel.from_base(base, text_projection_init=None, frozen_dtype=torch.bfloat16).eval()
    assert all(p.dtype == torch.bfloat16 for encoder in half.backbone.encoders for p in encoder.parameters())
    assert all(p.dtype == torch.float32 for p in half.parameters())
    latents = torch.randn(2, *full.config.latent_shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        text = half.encode_text(PROMPTS)
        assert text["context"].dtype == text["pooled"].dtype == torch.float32
        torch.testing.assert_close(half.score(latents, torch.tensor([100.0, 700.0]), PROMPTS),
                                   full.score(latents, torch.tensor([100.0, 700.0]), PROMPTS), rtol=0.05, atol=0.05)
