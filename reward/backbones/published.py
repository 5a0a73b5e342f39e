"""The published configs of the SD1.5, SDXL, SD3.5-Medium, SD3.5-Large and FLUX.1-dev base pipelines
(`sd-legacy/stable-diffusion-v1-5`, `stabilityai/stable-diffusion-xl-base-1.0`,
`stabilityai/stable-diffusion-3.5-medium`, `stabilityai/stable-diffusion-3.5-large`, `black-forest-labs/FLUX.1-dev`):
the architectures at their real size, for planning, tests and benchmarks without a download. `write_pipeline_configs`
writes them as a config-only pipeline folder (no weights), which `--dry-run` reads as it would the real pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CLIP_L_TEXT = {  # openai/clip-vit-large-patch14's text tower: SD1.x's text encoder, SDXL's first
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408, "hidden_size": 768,
    "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "projection_dim": 768, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
CLIP_BIGG_TEXT = {  # OpenCLIP ViT-bigG-14's text tower with its projection: SDXL's second text encoder
    "architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model", "vocab_size": 49408,
    "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
    "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 1280, "bos_token_id": 0,
    "eos_token_id": 2, "pad_token_id": 1,
}
SD_VAE = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
FLOW_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX_SCHEDULER = {**FLOW_SCHEDULER, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                  "base_image_seq_len": 256, "max_image_seq_len": 4096}
T5_XXL = {  # google/t5-v1_1-xxl's encoder: SD3's third text encoder, FLUX.1's second
    "architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": 32128, "d_model": 4096, "d_ff": 10240,
    "d_kv": 64, "num_heads": 64, "num_layers": 24, "feed_forward_proj": "gated-gelu", "is_gated_act": True,
    "dense_act_fn": "gelu_new", "relative_attention_num_buckets": 32, "pad_token_id": 0, "eos_token_id": 1,
}

PIPELINES: dict[str, dict[str, Any]] = {
    "sd15": {
        "model_index": {"_class_name": "StableDiffusionPipeline"},
        "unet": {
            "_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4, "out_channels": 4,
            "layers_per_block": 2, "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768,
            "attention_head_dim": 8, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        },
        "vae": {**SD_VAE, "sample_size": 512, "scaling_factor": 0.18215},
        "text_encoder": CLIP_L_TEXT,
    },
    "sdxl": {
        "model_index": {"_class_name": "StableDiffusionXLPipeline"},
        "unet": {
            "_class_name": "UNet2DConditionModel", "sample_size": 128, "in_channels": 4, "out_channels": 4,
            "layers_per_block": 2, "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
            "attention_head_dim": [5, 10, 20], "transformer_layers_per_block": [1, 2, 10],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
        },
        "vae": {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025},
        "text_encoder": CLIP_L_TEXT,
        "text_encoder_2": CLIP_BIGG_TEXT,
    },
    "sd35m": {
        "model_index": {"_class_name": "StableDiffusion3Pipeline"},
        "transformer": {
            "_class_name": "SD3Transformer2DModel", "sample_size": 128, "patch_size": 2, "in_channels": 16,
            "out_channels": 16, "num_layers": 24, "attention_head_dim": 64, "num_attention_heads": 24,
            "joint_attention_dim": 4096, "caption_projection_dim": 1536, "pooled_projection_dim": 2048,
            "pos_embed_max_size": 384, "dual_attention_layers": list(range(13)), "qk_norm": "rms_norm",
        },
        "vae": {**SD_VAE, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 1.5305,
                "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False},
        "text_encoder": {**CLIP_L_TEXT, "architectures": ["CLIPTextModelWithProjection"]},
        "text_encoder_2": CLIP_BIGG_TEXT,
        "text_encoder_3": T5_XXL,
        "scheduler": FLOW_SCHEDULER,
    },
}
SD3_VAE = PIPELINES["sd35m"]["vae"]
PIPELINES["sd35l"] = {  # SD3.5-Large: 38 joint blocks of 38 heads, none with the second (dual) attention
    **PIPELINES["sd35m"],
    "transformer": {
        "_class_name": "SD3Transformer2DModel", "sample_size": 128, "patch_size": 2, "in_channels": 16,
        "out_channels": 16, "num_layers": 38, "attention_head_dim": 64, "num_attention_heads": 38,
        "joint_attention_dim": 4096, "caption_projection_dim": 2432, "pooled_projection_dim": 2048,
        "pos_embed_max_size": 192, "dual_attention_layers": [], "qk_norm": "rms_norm",
    },
}
PIPELINES["flux"] = {  # FLUX.1-dev: 19 double- and 38 single-stream blocks, guidance-distilled
    "model_index": {"_class_name": "FluxPipeline"},
    "transformer": {
        "_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64, "num_layers": 19,
        "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
        "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": [16, 56, 56],
    },
    "vae": {**SD_VAE, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159,
            "use_quant_conv": False, "use_post_quant_conv": False},
    "text_encoder": CLIP_L_TEXT,
    "text_encoder_2": T5_XXL,
    "scheduler": FLUX_SCHEDULER,
}


def write_pipeline_configs(family: str, out: str | Path, without: tuple[str, ...] = ()) -> Path:
    """A pipeline folder holding the published configs of `family` (sd15, sdxl, sd35m, sd35l or flux) and no
    weights; `without`: components left out (SD3's pipeline runs without its T5, `text_encoder_3`)."""
    out = Path(out)
    components = {name: config for name, config in PIPELINES[family].items() if name not in without}
    out.mkdir(parents=True, exist_ok=True)
    index = dict(components["model_index"])
    scheduler = components.get("scheduler", SCHEDULER)
    for name, config in components.items():
        if name in ("model_index", "scheduler"):
            continue
        (out / name).mkdir(exist_ok=True)
        (out / name / "config.json").write_text(json.dumps(config, indent=2))
        index[name] = ["diffusers", config["_class_name"]] if "_class_name" in config else \
            ["transformers", config["architectures"][0]]
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index["scheduler"] = ["diffusers", scheduler["_class_name"]]
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out
