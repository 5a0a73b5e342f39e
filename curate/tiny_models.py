"""Tiny random-weight models in the real on-disk formats, for offline tests and smoke runs.

`build_tiny_models(out_dir)` writes one folder per role, each loadable by the loader that takes the real model:
``load_scorer("pickscore", dir/"pickscore")`` (and clip, vqa, aesthetic), ``StableDiffusionPipeline.from_pretrained(
dir/"sd15")``, ``StableDiffusionXLPipeline.from_pretrained(dir/"sdxl")``. Weights are random from a fixed seed, the
structures are those of the real models at tiny widths, and the tokenizers are built here, so nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterable
from itertools import pairwise
from pathlib import Path
from typing import Any

from curate.errors import InputError

logger = logging.getLogger(__name__)

ROLES: tuple[str, ...] = ("pickscore", "clip", "vqa", "aesthetic", "sd15", "sdxl")
SCORER_IMAGE_SIZE = 32  # pixels seen by the tiny CLIP towers
PATCH_SIZE = 8
SD_SAMPLE_SIZE = 8  # latents; the VAE's 8x downsampling makes 64-pixel images
TEXT_WIDTH = 32
CONTEXT_LENGTH = 77
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
AESTHETIC_HEAD_FILE = "aesthetic_head.safetensors"
VQA_SPECIAL_TOKENS = ("<unk>", "<pad>", "<s>", "</s>", "<image>", "<|im_start|>", "<|im_end|>")
# A ChatML template that takes transformers' structured content (image and text items).
VQA_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def clip_tokenizer() -> Any:
    """A CLIPTokenizer over single bytes (no merges): any caption tokenises, the vocabulary has 514 entries."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)  # the highest id, as in CLIP: open_clip-style argmax pooling finds it
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CONTEXT_LENGTH)


def _clip_text_config(tokenizer: Any, **extra: Any) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=2 * TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CONTEXT_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _clip_vision_config() -> Any:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=SCORER_IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )


def _clip_image_processor() -> Any:
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": SCORER_IMAGE_SIZE},
        crop_size={"height": SCORER_IMAGE_SIZE, "width": SCORER_IMAGE_SIZE},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )


def _save_transformers_clip(path: Path, projection_dim: int) -> None:
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    tokenizer = clip_tokenizer()
    config = CLIPConfig(
        text_config=_clip_text_config(tokenizer).to_dict(),
        vision_config=_clip_vision_config().to_dict(),
        projection_dim=projection_dim,
    )
    CLIPModel(config).save_pretrained(path)
    CLIPProcessor(image_processor=_clip_image_processor(), tokenizer=tokenizer).save_pretrained(path)


def _build_pickscore(path: Path) -> None:
    _save_transformers_clip(path, projection_dim=16)


def _build_clip(path: Path) -> None:
    import open_clip
    from safetensors.torch import save_file

    # open_clip's default SimpleTokenizer (bundled BPE, 49408 tokens) is used, as for the real ViT-H-14.
    model_cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": SCORER_IMAGE_SIZE, "layers": 2, "width": 32, "head_width": 16,
                       "patch_size": PATCH_SIZE},
        "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 2},
    }
    preprocess_cfg = {"mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD, "interpolation": "bicubic",
                      "resize_mode": "shortest"}
    model = open_clip.CLIP(**model_cfg)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, path / "open_clip_model.safetensors")
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (path / "open_clip_config.json").write_text(json.dumps(config, indent=2))


def _vqa_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(VQA_SPECIAL_TOKENS)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    merges = [("Y", "e"), ("Ye", "s"), ("N", "o")]  # "Yes" and "No" are single tokens, as in real VLM vocabularies
    for left, right in merges:
        vocab[left + right] = len(vocab)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens(list(VQA_SPECIAL_TOKENS))
    # Like Llama tokenizers, prepend BOS when special tokens are added (the chat template does not write it).
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        extra_special_tokens={"image_token": "<image>"},
        chat_template=VQA_CHAT_TEMPLATE,
        model_max_length=512,
    )


def _build_vqa(path: Path) -> None:
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = _vqa_tokenizer()
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=_clip_vision_config(),
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    LlavaForConditionalGeneration(config).save_pretrained(path)
    processor = LlavaProcessor(
        image_processor=_clip_image_processor(),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=VQA_CHAT_TEMPLATE,
        num_additional_image_tokens=1,  # the CLS token, dropped again by the "default" feature strategy
    )
    processor.save_pretrained(path)


def _build_aesthetic(path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    projection_dim = 16
    _save_transformers_clip(path / "clip", projection_dim=projection_dim)
    widths = [projection_dim, 32, 16, 8, 4, 1]  # the real head is 768, 1024, 128, 64, 16, 1
    head = {}
    for index, (width_in, width_out) in zip((0, 2, 4, 6, 7), pairwise(widths), strict=True):
        layer = torch.nn.Linear(width_in, width_out)
        head[f"layers.{index}.weight"] = layer.weight.detach().contiguous()
        head[f"layers.{index}.bias"] = layer.bias.detach().contiguous()
    save_file(head, path / AESTHETIC_HEAD_FILE)
    config = {"lpo_scorer": "aesthetic", "clip_model": "clip", "head_file": AESTHETIC_HEAD_FILE}
    (path / "config.json").write_text(json.dumps(config, indent=2))


def _vae(scaling_factor: float) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=SD_SAMPLE_SIZE * 8,
        scaling_factor=scaling_factor,
    )


def _sd_scheduler_kwargs() -> dict[str, Any]:
    return {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
            "steps_offset": 1}


def _build_sd15(path: Path) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = clip_tokenizer()
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer))
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


def _build_sdxl(path: Path) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = clip_tokenizer()
    pooled_dim = 32
    time_embed_dim = 8
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(tokenizer, projection_dim=pooled_dim))
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


_BUILDERS: dict[str, Callable[[Path], None]] = {
    "pickscore": _build_pickscore,
    "clip": _build_clip,
    "vqa": _build_vqa,
    "aesthetic": _build_aesthetic,
    "sd15": _build_sd15,
    "sdxl": _build_sdxl,
}


def build_tiny_models(out_dir: str | Path, roles: Iterable[str] = ROLES, seed: int = 0) -> dict[str, Path]:
    """Write a tiny model folder per role under `out_dir` (replacing old ones); return role -> folder."""
    import torch

    roles = tuple(roles)
    unknown = [role for role in roles if role not in _BUILDERS]
    if unknown:
        raise InputError(f"unknown tiny model role(s) {unknown}: expected some of {', '.join(ROLES)}")
    paths = {}
    for role in roles:
        path = Path(out_dir) / role
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        torch.manual_seed(seed)  # per role, so a folder does not depend on which roles were built before it
        _BUILDERS[role](path)
        logger.info("wrote tiny %s model to %s", role, path)
        paths[role] = path
    return paths
