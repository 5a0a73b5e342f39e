"""ImageReward: ``(MLP(BLIP [CLS]) - 0.16717362830052426) / 1.0333394966054072``, the BLIP text encoder
cross-attending to the BLIP ViT image tokens, its [CLS] feature through the 5-layer MLP, normalised with the
constants of the ImageReward authors (about N(0, 1)).

It runs on stock pieces: timm's VisionTransformer (the BLIP ViT's parameter layout) and transformers'
BlipTextModel (BLIP's ``med.py`` encoder), loading ``ImageReward.pt`` strictly; the ``image-reward`` package pins
timm 0.6.13 and imports functions transformers 5 removed, so it is not used.
"""

from __future__ import annotations

import importlib.util
import logging
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor
from transformers import AutoTokenizer, BlipTextConfig, BlipTextModel

from lpo.core.errors import InputError
from lpo.curate.scorers.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Scorer, laion_mlp_head, read_state_dict
from lpo.curate.scorers.specs import IMAGEREWARD_REPO, describe_dir, hub_file, local_path, read_json, resolve_relative

logger = logging.getLogger(__name__)

IMAGEREWARD_CHECKPOINT = "ImageReward.pt"
IMAGEREWARD_MED_CONFIG = "med_config.json"
IMAGEREWARD_TOKENIZER = "bert-base-uncased"
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
IMAGEREWARD_TEXT_LENGTH = 35
# BLIP ViT-L/16 at 224 px, the image encoder of ImageReward.
BLIP_VIT_LARGE = {"image_size": 224, "patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16}
EVAL_EXTRA_HINT = "pip install 'lpo[eval]'"


def normalise_imagereward(raw: torch.Tensor) -> torch.Tensor:
    """ImageReward's standardisation of the MLP output, with its authors' constants."""
    return (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


class ImageRewardScorer(Scorer):
    """ImageReward: BLIP text [CLS] cross-attending to the image -> MLP -> standardised."""

    def __init__(self, vision: torch.nn.Module, text_encoder: torch.nn.Module, head: torch.nn.Module, tokenizer: Any,
                 image_size: int, model_id: str, device: str, dtype: torch.dtype) -> None:
        super().__init__("imagereward", model_id, f"(MLP(BLIP) - {IMAGEREWARD_MEAN:.4f}) / {IMAGEREWARD_STD:.4f}, "
                         "about N(0, 1) (SD1.5 ~0.0, SDXL ~0.5)", device, dtype)
        self.vision = vision
        self.text_encoder = text_encoder
        self.head = head
        self.tokenizer = tokenizer
        self.transform = Compose([
            Resize(image_size, interpolation=InterpolationMode.BICUBIC), CenterCrop(image_size), ToTensor(),
            Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
        ])

    def features(self, images: list[Image.Image], captions: list[str]) -> torch.Tensor:
        """The text encoder's [CLS] feature for each (image, caption), before the MLP."""

        pixels = torch.stack([self.transform(image) for image in images]).to(self.device, self.dtype)
        image_embeds = self.vision.forward_features(pixels)
        tokens = self.tokenizer(captions, padding="max_length", truncation=True, max_length=IMAGEREWARD_TEXT_LENGTH,
                                return_tensors="pt").to(self.device)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text_encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                                encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask)
        return out.last_hidden_state[:, 0].float()

    def _score(self, images: list[Image.Image], captions: list[str]) -> torch.Tensor:
        return normalise_imagereward(self.head(self.features(images, captions))[:, 0])


def _imagereward_files(spec: str, download: bool) -> tuple[dict[str, Any], Path | None, Path | None, str]:
    """(lpo config, checkpoint, med config, model id); the files are None for a hub id when not downloaded."""
    path = local_path("imagereward", spec)
    if path is None:
        if not download:
            return {}, None, None, spec
        return ({}, hub_file("imagereward", spec, IMAGEREWARD_CHECKPOINT),
                hub_file("imagereward", spec, IMAGEREWARD_MED_CONFIG), spec)
    expected = (f"a folder with {IMAGEREWARD_CHECKPOINT} and {IMAGEREWARD_MED_CONFIG} (a copy of "
                f"{IMAGEREWARD_REPO})")
    if not path.is_dir():
        raise InputError(f"imagereward model {str(path)!r} is a file: expected {expected}")
    config: dict[str, Any] = {}
    if (path / "config.json").is_file():
        config = read_json(path / "config.json")
        if config.get("lpo_scorer") != "imagereward":
            raise InputError(f"imagereward model {str(path)!r}: expected {expected}, found "
                             f"{describe_dir(path)}; pass such a folder or {IMAGEREWARD_REPO!r}")
    files = [path / config.get("checkpoint", IMAGEREWARD_CHECKPOINT), path / config.get("med_config",
                                                                                           IMAGEREWARD_MED_CONFIG)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise InputError(f"imagereward model {str(path)!r} lacks {missing}: expected {expected}")
    tokenizer = config.get("tokenizer")
    if tokenizer is not None:
        config["tokenizer"] = resolve_relative(path, tokenizer)
    return config, files[0], files[1], str(path)


def _require_timm(metric: str) -> None:
    if importlib.util.find_spec("timm") is None:
        raise InputError(f"{metric} needs the timm package (its BLIP image encoder), which is not installed: run "
                         f"`{EVAL_EXTRA_HINT}`")


def _load_part(module: torch.nn.Module, state: dict[str, torch.Tensor], prefix: str, source: str,
               skip: tuple[str, ...] = ()) -> None:
    part = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    for key in skip:
        part.pop(key, None)
    try:
        module.load_state_dict(part)
    except RuntimeError as err:
        raise InputError(f"{source}: the weights under {prefix!r} do not fit the ImageReward model: "
                         f"{str(err)[:400]}; pass the original ImageReward.pt with its med_config.json") from None


def load_imagereward(spec: str, device: str, dtype: torch.dtype) -> Scorer:
    from timm.models.vision_transformer import VisionTransformer

    config, checkpoint, med_file, model_id = _imagereward_files(spec, download=True)
    vision_cfg = {**BLIP_VIT_LARGE, **config.get("vision", {})}
    med = read_json(med_file)
    logger.info("loading imagereward %s on %s as %s", model_id, device, dtype)
    vision = VisionTransformer(
        img_size=vision_cfg["image_size"], patch_size=vision_cfg["patch_size"], embed_dim=vision_cfg["embed_dim"],
        depth=vision_cfg["depth"], num_heads=vision_cfg["num_heads"], mlp_ratio=4.0, qkv_bias=True, num_classes=0,
        global_pool="", norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
    )
    text_config = BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], intermediate_size=med["intermediate_size"],
        num_hidden_layers=med["num_hidden_layers"], num_attention_heads=med["num_attention_heads"],
        max_position_embeddings=med["max_position_embeddings"], hidden_act=med.get("hidden_act", "gelu"),
        layer_norm_eps=med.get("layer_norm_eps", 1e-12), pad_token_id=med.get("pad_token_id", 0),
        bos_token_id=None, eos_token_id=None, sep_token_id=None,
        encoder_hidden_size=vision_cfg["embed_dim"], is_decoder=True,  # is_decoder builds the cross-attention layers
    )
    text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
    state = read_state_dict(checkpoint)
    source = f"imagereward checkpoint {checkpoint}"
    _load_part(vision, state, "blip.visual_encoder.", source)
    # BLIP's med.py stores position_ids as a buffer; transformers rebuilds it.
    _load_part(text_encoder, state, "blip.text_encoder.", source, skip=("embeddings.position_ids",))
    head = laion_mlp_head({k.removeprefix("mlp."): v for k, v in state.items() if k.startswith("mlp.")}, source,
                          "ImageReward")
    if head[0].in_features != text_config.hidden_size:
        raise InputError(f"{source}: the MLP takes {head[0].in_features}-d features but the text encoder is "
                         f"{text_config.hidden_size}-d; pair ImageReward.pt with its own med_config.json")
    tokenizer = AutoTokenizer.from_pretrained(config.get("tokenizer", IMAGEREWARD_TOKENIZER))
    vision = vision.to(device, dtype).eval()
    text_encoder = text_encoder.to(device, dtype).eval()
    return ImageRewardScorer(vision, text_encoder, head.to(device).eval(), tokenizer, vision_cfg["image_size"],
                             model_id, device, dtype)


def check_imagereward(spec: str) -> None:
    _require_timm("imagereward")
    _imagereward_files(spec, download=False)


def prefetch_imagereward(spec: str) -> None:
    """Download the checkpoint, its med_config.json and the tokenizer now, so an unavailable file stops a run
    before its images are generated rather than after."""
    config, *_ = _imagereward_files(spec, download=True)
    tokenizer = config.get("tokenizer", IMAGEREWARD_TOKENIZER)
    if not Path(tokenizer).exists():
        try:
            AutoTokenizer.from_pretrained(tokenizer)
        except OSError as err:
            raise InputError(f"imagereward needs the tokenizer {tokenizer!r}, which could not be read ({err}); "
                             "download it or put a tokenizer folder beside ImageReward.pt") from None
