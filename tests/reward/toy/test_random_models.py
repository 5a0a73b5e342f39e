"""Tiny models: each folder is in the real on-disk format, reloads with its real loader, runs, and is reproducible."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lpo.core.errors import InputError
from lpo.curate.scorers import METRICS, load_scorer
from lpo.reward.toy.random_models import ROLES, build_tiny_models, clip_tokenizer

EXPECTED_FILES = {
    "pickscore": ["config.json", "model.safetensors", "processor_config.json", "tokenizer.json"],
    "clip": ["open_clip_config.json", "open_clip_model.safetensors"],
    "vqa": ["config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "chat_template.jinja"],
    "aesthetic": ["config.json", "aesthetic_head.safetensors", "clip/config.json", "clip/model.safetensors",
                  "clip/processor_config.json"],
    "sd15": ["model_index.json", "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
             "text_encoder/model.safetensors", "tokenizer/tokenizer.json", "scheduler/scheduler_config.json"],
    "sdxl": ["model_index.json", "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
             "text_encoder/model.safetensors", "text_encoder_2/model.safetensors", "tokenizer/tokenizer.json",
             "tokenizer_2/tokenizer.json", "scheduler/scheduler_config.json"],
    "sd3": ["model_index.json", "transformer/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
            "text_encoder_2/model.safetensors", "text_encoder_3/model.safetensors", "tokenizer/tokenizer.json",
            "tokenizer_2/tokenizer.json", "tokenizer_3/tokenizer.json", "scheduler/scheduler_config.json"],
    "flux": ["model_index.json", "transformer/diffusion_pytorch_model.safetensors",
             "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
             "text_encoder_2/model.safetensors", "tokenizer/tokenizer.json", "tokenizer_2/tokenizer.json",
             "scheduler/scheduler_config.json"],
    "hpsv2": ["open_clip_config.json", "HPS_v2_compressed.pt"],
    "hpsv21": ["open_clip_config.json", "HPS_v2.1_compressed.pt"],
    "imagereward": ["config.json", "ImageReward.pt", "med_config.json", "tokenizer/vocab.txt"],
    "geneval": ["detector/config.json", "detector/model.safetensors", "detector/preprocessor_config.json",
                "clip/open_clip_config.json", "clip/open_clip_model.safetensors"],
    **{f"t2i-{kind}": ["config.json", "model.safetensors", "processor_config.json", "vocab.txt"]
       for kind in ("color", "shape", "texture")},
}


def _weights(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    found = {str(p.relative_to(folder)): load_file(p) for p in sorted(folder.rglob("*.safetensors"))}
    for path in sorted(folder.rglob("*.pt")):  # HPS and ImageReward checkpoints are torch state dicts
        state = torch.load(path, weights_only=True)
        found[str(path.relative_to(folder))] = state.get("state_dict", state)
    return found


def test_build_writes_every_role_folder(tiny_models_dir: Path) -> None:
    assert set(EXPECTED_FILES) == set(ROLES)
    for role, files in EXPECTED_FILES.items():
        missing = [name for name in files if not (tiny_models_dir / role / name).is_file()]
        assert not missing, (role, missing)


def test_clip_tokenizer_covers_any_caption() -> None:
    tokenizer = clip_tokenizer()
    ids = tokenizer("Ünïcödé café 🐱, 3 dogs!")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.eos_token_id not in ids[1:-1]  # the unknown token is <|endoftext|>: nothing fell back to it
    assert tokenizer.eos_token_id == len(tokenizer) - 1


@pytest.mark.parametrize("metric", METRICS)
def test_scorer_folders_load_and_score(metric: str, tiny_models_dir: Path) -> None:
    scorer = load_scorer(metric, str(tiny_models_dir / metric))
    image = Image.fromarray(np.full((64, 64, 3), 128, dtype=np.uint8))
    text = {"prompt": "a photo of a car", "tag": "single_object", "include": [{"class": "car", "count": 1}]} \
        if getattr(scorer, "needs_records", False) else "a grey square"
    scores = scorer.score([image], [text])
    assert scores.shape == (1,) and np.isfinite(scores).all()


@pytest.mark.parametrize("role", ["imagereward", "t2i-color"])
def test_bert_tokenizers_spell_any_lower_case_caption(role: str, tiny_models_dir: Path) -> None:
    """The tiny BERT tokenizers hold their character vocabulary (no caption falls back to [UNK]), and BLIP's knows
    its decoder token and the answers as whole words but, as transformers' BLIP tokenizers, not BLIP's encoder token,
    whose row the model's vocabulary holds right after the decoder token's."""
    from transformers import AutoTokenizer

    folder = tiny_models_dir / role / ("tokenizer" if role == "imagereward" else "")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("a red car, 3 dogs!").input_ids
    assert tokenizer.unk_token_id not in ids and len(ids) > 10
    if role == "t2i-color":
        assert tokenizer.tokenize("yes no") == ["yes", "no"]
        decoder_start = tokenizer.convert_tokens_to_ids("[DEC]")
        assert decoder_start != tokenizer.unk_token_id
        assert tokenizer.convert_tokens_to_ids("[ENC]") == tokenizer.unk_token_id
        config = json.loads((folder / "config.json").read_text())["text_config"]
        assert config["bos_token_id"] == decoder_start == len(tokenizer) - 1
        assert config["vocab_size"] == len(tokenizer) + 1


def _generate(pipeline) -> Image.Image:
    generator = torch.Generator().manual_seed(0)
    return pipeline("a cat", num_inference_steps=2, height=64, width=64, generator=generator).images[0]


def test_sd15_has_the_sd15_structure_and_generates(tiny_models_dir: Path) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_models_dir / "sd15")
    pipeline.set_progress_bar_config(disable=True)
    unet, scheduler = pipeline.unet, pipeline.scheduler
    assert unet.config.down_block_types == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert unet.config.up_block_types == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert unet.config.cross_attention_dim == pipeline.text_encoder.config.hidden_size
    assert pipeline.vae.config.latent_channels == 4 and len(pipeline.vae.config.block_out_channels) == 4
    assert isinstance(scheduler, DDIMScheduler)
    assert (scheduler.config.beta_schedule, scheduler.config.beta_start, scheduler.config.beta_end) == (
        "scaled_linear", 0.00085, 0.012)
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.steps_offset == 1
    assert scheduler.config.set_alpha_to_one is False
    assert pipeline.safety_checker is None and pipeline.feature_extractor is None

    # Run the down path by hand, as a latent reward model does: 12 residuals, one per resolution at 2, 5, 8, 11.
    tokens = pipeline.tokenizer(["a cat"], padding="max_length", return_tensors="pt")
    with torch.no_grad():
        context = pipeline.text_encoder(tokens["input_ids"])[0]
        timestep = torch.tensor([500])
        emb = unet.time_embedding(unet.time_proj(timestep))
        sample = unet.conv_in(torch.randn(1, 4, 8, 8))
        residuals = (sample,)
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, res = block(sample, emb, encoder_hidden_states=context)
            else:
                sample, res = block(sample, emb)
            residuals += res
        mid = unet.mid_block(sample, emb, encoder_hidden_states=context)
    assert len(residuals) == 12
    assert [tuple(residuals[i].shape[-3:]) for i in (2, 5, 8, 11)] == [(16, 8, 8), (16, 4, 4), (32, 2, 2), (32, 1, 1)]
    assert mid.shape == (1, 32, 1, 1)
    assert _generate(pipeline).size == (64, 64)


def test_sdxl_has_the_sdxl_structure_and_generates(tiny_models_dir: Path) -> None:
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_models_dir / "sdxl")
    pipeline.set_progress_bar_config(disable=True)
    unet = pipeline.unet.config
    assert unet.down_block_types == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert unet.layers_per_block == 2 and unet.addition_embed_type == "text_time"
    assert isinstance(pipeline.text_encoder, CLIPTextModel)
    assert isinstance(pipeline.text_encoder_2, CLIPTextModelWithProjection)
    hidden = pipeline.text_encoder.config.hidden_size + pipeline.text_encoder_2.config.hidden_size
    assert unet.cross_attention_dim == hidden
    pooled = pipeline.text_encoder_2.config.projection_dim
    assert unet.projection_class_embeddings_input_dim == pooled + 6 * unet.addition_time_embed_dim
    assert _generate(pipeline).size == (64, 64)


def test_sd3_has_the_sd35_medium_structure_and_generates(tiny_models_dir: Path) -> None:
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_models_dir / "sd3")
    pipeline.set_progress_bar_config(disable=True)
    transformer = pipeline.transformer.config
    assert transformer.dual_attention_layers == [0] and transformer.qk_norm == "rms_norm"
    assert hasattr(pipeline.transformer.transformer_blocks[0], "attn2")
    assert isinstance(pipeline.text_encoder, CLIPTextModelWithProjection)
    assert isinstance(pipeline.text_encoder_2, CLIPTextModelWithProjection)
    assert isinstance(pipeline.text_encoder_3, T5EncoderModel)
    widths = pipeline.text_encoder.config.hidden_size + pipeline.text_encoder_2.config.hidden_size
    assert transformer.joint_attention_dim == pipeline.text_encoder_3.config.d_model >= widths
    assert transformer.pooled_projection_dim == (pipeline.text_encoder.config.projection_dim
                                                 + pipeline.text_encoder_2.config.projection_dim)
    assert pipeline.vae.config.latent_channels == 16 and pipeline.vae.config.shift_factor == pytest.approx(0.0609)
    assert pipeline.scheduler.config.shift == 3.0
    ids = pipeline.tokenizer_3(["a red circle"]).input_ids[0]
    assert ids[-1] == pipeline.tokenizer_3.eos_token_id and pipeline.tokenizer_3.unk_token_id not in ids
    assert _generate(pipeline).size == (64, 64)


def test_flux_has_the_flux_dev_structure_and_generates(tiny_models_dir: Path) -> None:
    from diffusers import FluxPipeline
    from transformers import CLIPTextModel, T5EncoderModel

    pipeline = FluxPipeline.from_pretrained(tiny_models_dir / "flux")
    pipeline.set_progress_bar_config(disable=True)
    transformer = pipeline.transformer.config
    assert transformer.guidance_embeds and transformer.in_channels == 4 * pipeline.vae.config.latent_channels
    blocks = pipeline.transformer
    assert len(blocks.transformer_blocks) == 3 and len(blocks.single_transformer_blocks) == 2
    assert sum(transformer.axes_dims_rope) == transformer.attention_head_dim
    assert isinstance(pipeline.text_encoder, CLIPTextModel) and isinstance(pipeline.text_encoder_2, T5EncoderModel)
    assert transformer.joint_attention_dim == pipeline.text_encoder_2.config.d_model
    assert transformer.pooled_projection_dim == pipeline.text_encoder.config.hidden_size
    assert pipeline.vae.config.shift_factor == pytest.approx(0.1159)
    assert pipeline.scheduler.config.use_dynamic_shifting
    assert _generate(pipeline).size == (64, 64)


def test_builder_is_deterministic_for_a_seed(tiny_models_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_models(tmp_path / "again", seed=0)
    assert set(again) == set(ROLES)
    for role, folder in again.items():
        first, second = _weights(tiny_models_dir / role), _weights(folder)
        assert first and first.keys() == second.keys(), role
        for name, tensors in first.items():
            assert tensors.keys() == second[name].keys()
            assert all(torch.equal(tensors[k], second[name][k]) for k in tensors), (role, name)
        for config in sorted((tiny_models_dir / role).rglob("*.json")):
            assert json.loads(config.read_text()) == json.loads((folder / config.relative_to(tiny_models_dir / role))
                                                                .read_text()), (role, config.name)
    other = build_tiny_models(tmp_path / "other", roles=["pickscore"], seed=1)["pickscore"]
    first, second = _weights(tiny_models_dir / "pickscore"), _weights(other)
    assert not torch.equal(first["model.safetensors"]["visual_projection.weight"],
                           second["model.safetensors"]["visual_projection.weight"])


def test_unknown_role_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown tiny model role.*sd4"):
        build_tiny_models(tmp_path, roles=["sd15", "sd4"])
    assert not (tmp_path / "sd15").exists()


def test_the_roles_help_names_every_role() -> None:
    from lpo.core.config import help_of
    from lpo.reward.toy.config import TinyModelsConfig

    named = help_of(TinyModelsConfig, "roles").split("): ", 1)[1].rstrip(".").split(", ")
    assert named == list(ROLES)


def test_the_command_line_writes_the_same_folders(tiny_models_dir: Path, tmp_path: Path) -> None:
    """`lpo dev tiny-models DIR --roles ...`: the folders the library writes, weight for weight, and a listing."""
    from typer.testing import CliRunner

    from lpo.cli import app

    result = CliRunner().invoke(app, ["dev", "tiny-models", str(tmp_path / "cli"), "--roles", "clip,aesthetic"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["aesthetic", "clip"]
    assert "clip" in result.output and "aesthetic" in result.output
    for role in ("clip", "aesthetic"):
        first, second = _weights(tiny_models_dir / role), _weights(tmp_path / "cli" / role)
        assert first and first.keys() == second.keys()
        assert all(torch.equal(t, second[name][k]) for name, tensors in first.items() for k, t in tensors.items())
    bad = CliRunner().invoke(app, ["dev", "tiny-models", str(tmp_path / "bad"), "--roles", "sd4"])
    assert bad.exit_code == 2 and "sd4" in bad.output and not (tmp_path / "bad").exists()
