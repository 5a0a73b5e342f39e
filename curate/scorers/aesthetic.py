"""The LAION improved aesthetic predictor: an MLP on the L2-normalised CLIP ViT-L/14 image embedding (captions
unused), 1-10 for real images."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from PIL import Image
from transformers import AutoImageProcessor, CLIPModel

from lpo.core.errors import InputError
from lpo.curate.scorers.base import Scorer, laion_mlp_head, normalise, pooled_features, read_state_dict
from lpo.curate.scorers.specs import (
    DEFAULT_MODELS,
    describe_dir,
    local_path,
    read_json,
    resolve_relative,
    transformers_config,
)

logger = logging.getLogger(__name__)

AESTHETIC_CLIP_MODEL = "openai/clip-vit-large-patch14"
AESTHETIC_HEAD_FILE = "aesthetic-model.pth"


class AestheticScorer(Scorer):
    """LAION improved aesthetic predictor: MLP on the L2-normalised CLIP image embedding (captions unused)."""

    def __init__(self, clip_model: Any, image_processor: Any, head: torch.nn.Module, model_id: str, device: str,
                 dtype: torch.dtype) -> None:
        super().__init__("aesthetic", model_id, "LAION aesthetic, ~1-10 for real images (SD1.5 ~5.5)", device, dtype)
        self.clip_model = clip_model
        self.image_processor = image_processor
        self.head = head

    def _score(self, images: list[Image.Image], captions: list[str]) -> torch.Tensor:
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        embedding = normalise(pooled_features(self.clip_model.get_image_features(pixel_values=pixels)))
        return self.head(embedding)[:, 0]


def _aesthetic_dir_config(path: Path) -> dict:
    config_file = path / "config.json"
    config = read_json(config_file) if config_file.is_file() else {}
    if config.get("lpo_scorer") != "aesthetic":
        raise InputError(
            f"aesthetic model {str(path)!r}: expected an aesthetic predictor folder (config.json with "
            f"lpo_scorer 'aesthetic', clip_model and head_file), found {describe_dir(path)}; pass such a folder "
            f"or the hub id {DEFAULT_MODELS['aesthetic']!r}"
        )
    for key in ("clip_model", "head_file"):
        if not isinstance(config.get(key), str):
            raise InputError(f"aesthetic model {str(path)!r}: {config_file} lacks the string field {key!r}")
    return config


def check_aesthetic(spec: str) -> None:
    path = local_path("aesthetic", spec)
    if path is None:
        return  # a hub repo holding a head file; the head and its CLIP backbone are checked when loaded
    if not path.is_dir():
        raise InputError(f"aesthetic model {str(path)!r} is a file: expected a folder with config.json")
    config = _aesthetic_dir_config(path)
    head = path / config["head_file"]
    if not head.is_file():
        raise InputError(
            f"aesthetic model {str(path)!r}: head_file {config['head_file']!r} does not exist in the folder; "
            "fix config.json or add the file"
        )
    clip_model = resolve_relative(path, config["clip_model"])
    transformers_config("aesthetic", clip_model, "a CLIP model (model_type 'clip')", lambda t: t == "clip")


def load_aesthetic(spec: str, device: str, dtype: torch.dtype, clip_model: str | None = None,
                    head_file: str | None = None) -> Scorer:
    path = local_path("aesthetic", spec)
    if path is not None:
        config = _aesthetic_dir_config(path)
        head_path = path / (head_file or config["head_file"])
        clip_model = clip_model or resolve_relative(path, config["clip_model"])
    else:
        head_path = Path(hf_hub_download(spec, head_file or AESTHETIC_HEAD_FILE))
        clip_model = clip_model or AESTHETIC_CLIP_MODEL
    transformers_config("aesthetic", clip_model, "a CLIP model (model_type 'clip')", lambda t: t == "clip")
    if not head_path.is_file():
        raise InputError(f"aesthetic head file {str(head_path)!r} does not exist: fix head_file")
    logger.info("loading aesthetic head %s on CLIP %s on %s as %s", head_path, clip_model, device, dtype)
    head = laion_mlp_head(read_state_dict(head_path), f"aesthetic head {head_path}", "LAION aesthetic")
    clip = CLIPModel.from_pretrained(clip_model, dtype=dtype).to(device).eval()
    if head[0].in_features != clip.config.projection_dim:
        raise InputError(
            f"aesthetic head {str(head_path)!r} takes {head[0].in_features}-d embeddings but CLIP {clip_model!r} "
            f"projects to {clip.config.projection_dim}; pair the head with the CLIP it was trained on"
        )
    image_processor = AutoImageProcessor.from_pretrained(clip_model)
    return AestheticScorer(clip, image_processor, head.to(device).eval(), spec, device, dtype)
