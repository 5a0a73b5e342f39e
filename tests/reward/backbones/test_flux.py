"""The FLUX.1 family on the tiny FLUX.1-dev-style pipeline: packing as the pipeline packs, its prompt encoding,
sampling that reproduces `FluxPipeline`, the LRM backbone against the stock transformer, and the refusal of a
timestep-distilled (schnell-style) model for LPO."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lpo.core.errors import InputError
from lpo.reward.backbones import FAMILIES, family_of, load_generator
from lpo.reward.backbones.flux import image_ids, pack, unpack
from lpo.reward.lpo.sampler import sample
from lpo.reward.lrm.model import LatentRewardModel

PROMPTS = ["a red circle", "a blue square on green"]


@pytest.fixture(scope="module")
def flux(tiny_models_dir: Path) -> str:
    return str(tiny_models_dir / "flux")


def test_packing_and_ids_are_the_pipelines(flux: str) -> None:
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 8, 6, generator=torch.Generator().manual_seed(0))
    packed = pack(latents)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 2, 16, 8, 6))
    assert torch.equal(unpack(packed, 8, 6), latents)
    torch.testing.assert_close(image_ids(8, 6, "cpu", torch.float32),
                               FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32))
    assert family_of(flux).name == "flux" and FAMILIES["flux"].flow_matching


def test_lrm_prompt_encoding_equals_the_pipelines(flux: str) -> None:
    pipeline = family_of(flux).load_pipeline(flux)
    lrm = LatentRewardModel.from_base(flux, text_projection_init=None)
    with torch.no_grad():
        context, pooled, _ = pipeline.encode_prompt(PROMPTS, None, max_sequence_length=512)
        ours = lrm.backbone.encode_text(PROMPTS)
    torch.testing.assert_close(ours["context"], context)
    torch.testing.assert_close(ours["pooled"], pooled)


def test_sampling_at_noise_level_zero_reproduces_the_pipeline(flux: str) -> None:
    """Our grid (linear sigmas shifted by the token count), embedded guidance and step (a = 0) give the pipeline's
    latents for the same noise."""
    pipeline = family_of(flux).load_pipeline(flux)
    packed = pipeline(PROMPTS[0], num_inference_steps=4, guidance_scale=3.5, height=64, width=64,
                      output_type="latent", generator=torch.Generator().manual_seed(7)).images
    model = load_generator(flux)
    assert model.resolution == 64 and model.latent_shape == (16, 8, 8)
    ours = sample(model, model.encode_prompts(PROMPTS[:1]), [torch.Generator().manual_seed(7)], steps=4,
                  guidance=3.5, eta=0.0)["latents"]
    torch.testing.assert_close(ours, unpack(packed, 8, 8), rtol=1e-4, atol=1e-5)
    assert model.timesteps(4) == pipeline.scheduler.timesteps.tolist()


def test_truncated_lrm_equals_the_stock_double_stream_blocks(flux: str) -> None:
    from diffusers import FluxTransformer2DModel

    stock = FluxTransformer2DModel.from_pretrained(flux, subfolder="transformer").eval()
    lrm = LatentRewardModel.from_base(flux, text_projection_init=None).eval()
    backbone = lrm.backbone
    assert backbone.depth == stock.config.num_layers == 3 and lrm.config.taps == [1, 2]
    assert len(backbone.transformer.single_transformer_blocks) == 0 and backbone.transformer.proj_out is None
    captured: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(lambda m, i, o: captured.append(o[1])) for block in stock.transformer_blocks]
    latents = torch.randn(2, *lrm.config.latent_shape, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([960.0, 150.0])
    with torch.no_grad():
        text = lrm.encode_text(PROMPTS)
        stock(hidden_states=pack(latents), timestep=timesteps / 1000, guidance=torch.full((2,), 3.5),
              pooled_projections=text["pooled"], encoder_hidden_states=text["context"],
              txt_ids=torch.zeros(text["context"].shape[1], 3), img_ids=image_ids(8, 8, "cpu", torch.float32))
        ours = backbone.block_outputs(latents, timesteps, text)
    for hook in hooks:
        hook.remove()
    assert len(ours) == len(captured) == 3
    for mine, theirs in zip(ours, captured):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    assert not any(k.startswith("backbone.transformer.single_transformer_blocks") for k in lrm.state_dict())


def test_lrm_save_and_load_give_identical_scores(flux: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    lrm = LatentRewardModel.from_base(flux, text_projection_init=None, depth=2).eval()
    assert lrm.text_projection.weight.shape == (32, 32)  # CLIP-L's pooled output, projected by the reward model
    latents = torch.randn(2, *lrm.config.latent_shape, generator=torch.Generator().manual_seed(1))
    timesteps = torch.tensor([9.0, 600.0])
    with torch.no_grad():
        scores = lrm.score(latents, timesteps, PROMPTS)
    lrm.save_pretrained(tmp_path / "lrm")
    assert not any("text_encoder" in k for k in load_file(tmp_path / "lrm" / "diffusion_pytorch_model.safetensors"))
    loaded = LatentRewardModel.from_pretrained(tmp_path / "lrm")
    assert loaded.backbone.depth == 2 and loaded.config.vae_shift_factor == pytest.approx(0.1159)
    with torch.no_grad():
        torch.testing.assert_close(loaded.score(latents, timesteps, PROMPTS), scores)


def test_a_timestep_distilled_flux_is_refused_for_lpo(flux: str, tmp_path: Path) -> None:
    from lpo.reward.lpo import train as lpo_train
    from lpo.reward.lpo.config import LPOConfig

    schnell = tmp_path / "schnell"
    shutil.copytree(flux, schnell)
    config_path = schnell / "transformer" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "guidance_embeds": False}))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    config = LPOConfig(family="flux", base=str(schnell), lrm=tmp_path, prompts=prompts, out=tmp_path / "out")
    with pytest.raises(InputError, match="timestep-distilled FLUX model"):
        lpo_train.validate(config)
    # sampling still works (no guidance input), and so does the reward model's backbone
    model = load_generator(str(schnell))
    latents = sample(model, model.encode_prompts(PROMPTS[:1]), [torch.Generator().manual_seed(0)], steps=2,
                     guidance=3.5, eta=0.0)["latents"]
    assert torch.isfinite(latents).all()
