"""Tiny random-weight diffusion pipelines in the real on-disk formats (SD1.5, SDXL, SD3.5-Medium and FLUX.1-dev
layouts at tiny widths), for offline tests: `lpo dev tiny-models` writes them beside the tiny scorers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from lpo.reward.toy.random_text import TEXT_WIDTH, clip_text_config, clip_tokenizer, t5_tokenizer

SD_SAMPLE_SIZE = 8  # latents; the VAE's 8x downsampling makes 64-pixel images


def _vae(scaling_factor: float, latent_channels: int = 4, shift_factor: float | None = None) -> Any:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=SD_SAMPLE_SIZE * 8,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )


def _sd_scheduler_kwargs() -> dict[str, Any]:
    return {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
            "steps_offset": 1}


def build_sd15(path: Path) -> None:
    tokenizer = clip_tokenizer()
    text_encoder = CLIPTextModel(clip_text_config(tokenizer))
    # SD1.5 layout: 3 cross-attention down blocks + 1 plain, 2 layers each, so down_block_res_samples has 12
    # entries (2, 5, 8, 11 end each resolution) and a cross-attention mid block.
    unet = UNet2DConditionModel(
        sample_size=SD_SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=2,
        norm_num_groups=8,
    )
    scheduler = DDIMScheduler(**_sd_scheduler_kwargs(), set_alpha_to_one=False, clip_sample=False)
    pipeline = StableDiffusionPipeline(
        vae=_vae(scaling_factor=0.18215),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(path)


def build_sdxl(path: Path) -> None:
    tokenizer = clip_tokenizer()
    pooled_dim = 32
    time_embed_dim = 8
    text_encoder = CLIPTextModel(clip_text_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(tokenizer, projection_dim=pooled_dim))
    # SDXL layout: DownBlock2D then two cross-attention blocks, text_time conditioning on the pooled text
    # embedding plus 6 micro-conditioning values (original size, crop, target size).
    unet = UNet2DConditionModel(
        sample_size=SD_SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * TEXT_WIDTH,
        attention_head_dim=(2, 2, 2),
        transformer_layers_per_block=(1, 1, 1),
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=pooled_dim + 6 * time_embed_dim,
    )
    scheduler = EulerDiscreteScheduler(
        **_sd_scheduler_kwargs(), timestep_spacing="leading", interpolation_type="linear", prediction_type="epsilon"
    )
    pipeline = StableDiffusionXLPipeline(
        vae=_vae(scaling_factor=0.13025),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
    )
    pipeline.save_pretrained(path)


def build_sd3(path: Path) -> None:
    joint_dim = 2 * TEXT_WIDTH  # both CLIPs' penultimate states side by side; T5's width must match
    t5_tokenizer_ = t5_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer_), d_model=joint_dim, d_kv=8, d_ff=2 * joint_dim,
                                 num_layers=1, num_heads=2, pad_token_id=0, eos_token_id=1,
                                 decoder_start_token_id=0))
    # SD3.5-Medium layout at tiny width: 4 joint blocks, the first with the second (image-only) attention, RMS
    # q/k norm; a 2x2 patch embedding over 16-channel latents
    transformer = SD3Transformer2DModel(
        sample_size=SD_SAMPLE_SIZE, patch_size=2, in_channels=16, out_channels=16, num_layers=4,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=joint_dim, caption_projection_dim=16,
        pooled_projection_dim=2 * TEXT_WIDTH, pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
    )
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_vae(scaling_factor=1.5305, latent_channels=16, shift_factor=0.0609),
        text_encoder=CLIPTextModelWithProjection(clip_text_config(clip_tokenizer(), projection_dim=TEXT_WIDTH)),
        tokenizer=clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(clip_text_config(clip_tokenizer(), projection_dim=TEXT_WIDTH)),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer_,
    )
    pipeline.save_pretrained(path)


def build_flux(path: Path) -> None:
    t5_tokenizer_ = t5_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer_), d_model=TEXT_WIDTH, d_kv=8, d_ff=2 * TEXT_WIDTH,
                                 num_layers=1, num_heads=2, pad_token_id=0, eos_token_id=1,
                                 decoder_start_token_id=0))
    # FLUX.1-dev layout at tiny width: double-stream then single-stream blocks, RoPE over (text, row, column) ids,
    # a guidance embedder; 2x2-packed 16-channel latents (64 input channels)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=3, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TEXT_WIDTH, pooled_projection_dim=TEXT_WIDTH,
        guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    pipeline = FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=_vae(scaling_factor=0.3611, latent_channels=16, shift_factor=0.1159),
        text_encoder=CLIPTextModel(clip_text_config(clip_tokenizer())),
        tokenizer=clip_tokenizer(),
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer_,
    )
    pipeline.save_pretrained(path)
