"""Contrastive image-text scorers on CLIP towers: PickScore (transformers), the CLIP score of LPO's filter and HPS
v2 / v2.1 (open_clip).

- ``pickscore``: ``exp(logit_scale) * cos(image, text)`` of a transformers CLIPModel (PickScore_v1, about 20-23).
- ``clip``: raw cosine of normalised open_clip embeddings (LAION ViT-H-14, as in LPO's MPCF); no x100, no clamp.
- ``hpsv2`` / ``hpsv21``: ``100 * cos`` of open_clip ViT-H-14 with the HPS v2 / v2.1 checkpoint (``xswu/HPSv2``:
  ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt``), as the HPS and LPO tables print it (about 24-32). Two
  metric names because the two versions are not comparable. HPS runs on open_clip directly (the ``hpsv2`` package
  pins pytest 7.2 and protobuf < 4), with HPS's own image transform (``image_transform(..., resize_longest_max=True)``:
  the long side resized bicubic to the model's size, zero-padded to a centred square), not open_clip's short-side
  resize and centre crop; the two agree on square images.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

from lpo.core.errors import InputError
from lpo.curate.scorers.base import (
    TEXT_CACHE_SIZE,
    Scorer,
    TextFeatureCache,
    normalise,
    pooled_features,
    read_state_dict,
)
from lpo.curate.scorers.specs import (
    DEFAULT_MODELS,
    describe_dir,
    hub_file,
    hub_json,
    is_path_like,
    local_path,
    read_json,
    transformers_config,
)

logger = logging.getLogger(__name__)

PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
PICKSCORE_MAX_LENGTH = 77
OPEN_CLIP_CHECKPOINTS = ("*.safetensors", "*.bin", "*.pth", "*.pt")
OPEN_CLIP_PRECISION = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
HPS_ARCH = "ViT-H-14"
HPS_CHECKPOINTS = {"hpsv2": "HPS_v2_compressed.pt", "hpsv21": "HPS_v2.1_compressed.pt"}
HPS_SCALE = 100.0


# ----------------------------------------------------------------------------------------------------------------
# Scorers


class PickScoreScorer(Scorer):
    """PickScore: exp(logit_scale) * cosine of normalised CLIP image and text features."""

    def __init__(self, model: Any, processor: Any, model_id: str, device: str, dtype: torch.dtype,
                 text_cache_size: int = TEXT_CACHE_SIZE) -> None:
        super().__init__("pickscore", model_id, "exp(logit_scale) * cosine (~20-23 for real images)", device, dtype)
        self.model = model
        self.processor = processor
        self.text_features = TextFeatureCache(self._encode_text, text_cache_size)

    def _encode_text(self, captions: list[str]) -> torch.Tensor:
        tokens = self.processor(
            text=captions, padding=True, truncation=True, max_length=PICKSCORE_MAX_LENGTH, return_tensors="pt"
        ).to(self.device)
        return normalise(pooled_features(self.model.get_text_features(**tokens)))

    def _score(self, images: list[Image.Image], captions: list[str]) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        image_features = normalise(pooled_features(self.model.get_image_features(pixel_values=pixels)))
        text_features = self.text_features(captions)
        return self.model.logit_scale.exp().float() * (image_features * text_features).sum(-1)


class ClipScorer(Scorer):
    """CLIP score as in LPO's MPCF: raw cosine of normalised open_clip embeddings."""

    def __init__(self, model: Any, preprocess: Callable, tokenizer: Callable, model_id: str, device: str,
                 dtype: torch.dtype, text_cache_size: int = TEXT_CACHE_SIZE) -> None:
        super().__init__("clip", model_id, "cosine of normalised embeddings (~0.2-0.4 for real images)", device, dtype)
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.text_features = TextFeatureCache(self._encode_text, text_cache_size)

    def _encode_text(self, captions: list[str]) -> torch.Tensor:
        return normalise(self.model.encode_text(self.tokenizer(captions).to(self.device)))

    def _score(self, images: list[Image.Image], captions: list[str]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device, self.dtype)
        image_features = normalise(self.model.encode_image(pixels))
        return (image_features * self.text_features(captions)).sum(-1)


class LongSideTransform:
    """HPS's evaluation transform (its open_clip fork's `ResizeMaxSize`, then ToTensor and Normalize): the image
    resized bicubic so that its long side is `size` (each side rounded), pasted centred on a black `size` x `size`
    square (the extra column or row to the right or bottom), scaled to 0-1 and normalised. HPS leaves an image whose
    long side is already `size` unpadded, which its square-input model cannot take; here it is padded too."""

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.size, self.mean, self.std = size, mean, std

    def __call__(self, image: Image.Image) -> torch.Tensor:
        scale = self.size / max(image.size)
        width, height = (round(side * scale) for side in image.size)
        square = Image.new("RGB", (self.size, self.size), (0, 0, 0))
        square.paste(image.convert("RGB").resize((width, height), Image.BICUBIC),
                     ((self.size - width) // 2, (self.size - height) // 2))
        pixels = torch.from_numpy(np.asarray(square, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (pixels - torch.tensor(self.mean).view(3, 1, 1)) / torch.tensor(self.std).view(3, 1, 1)


class HpsScorer(ClipScorer):
    """HPS v2 / v2.1: 100 x the cosine of normalised open_clip image and text features."""

    def __init__(self, metric: str, model: Any, preprocess: Callable, tokenizer: Callable, model_id: str,
                 device: str, dtype: torch.dtype) -> None:
        super().__init__(model, preprocess, tokenizer, model_id, device, dtype)
        self.name = metric
        version = "v2.1" if metric == "hpsv21" else "v2"
        self.scale = f"100 x cosine (HPS {version}, as the HPS/LPO tables print it; ~24-32 for real images)"

    def _score(self, images: list[Image.Image], captions: list[str]) -> torch.Tensor:
        return HPS_SCALE * super()._score(images, captions)


# ----------------------------------------------------------------------------------------------------------------
# Spec checks (no weights are read)


def check_pickscore(spec: str) -> None:
    transformers_config("pickscore", spec, "a CLIP model (model_type 'clip')", lambda t: t == "clip")


def _has_processor_config(path: Path) -> bool:
    # transformers 5 writes processor_config.json; older versions and most hub repos preprocessor_config.json.
    return (path / "preprocessor_config.json").is_file() or (path / "processor_config.json").is_file()


def _check_processor(processor: str) -> None:
    path = Path(processor).expanduser()
    if (path.exists() or is_path_like(processor)) and not _has_processor_config(path):
        raise InputError(
            f"pickscore processor {processor!r}: expected a folder with preprocessor_config.json or "
            f"processor_config.json (or a hub id such as {PICKSCORE_PROCESSOR!r}); fix the path"
        )


def _open_clip_spec(spec: str) -> tuple[str, str | None, Path | None]:
    """(open_clip model name, pretrained tag or file, local dir) for a clip spec."""
    if spec.startswith("hf-hub:"):
        return spec, None, None
    if spec.startswith("local-dir:"):
        path = Path(spec.removeprefix("local-dir:")).expanduser()
        if not path.exists():
            raise InputError(
                f"clip model path {str(path)!r} does not exist: expected an open_clip model directory "
                "(open_clip_config.json + weights); fix the path"
            )
        return "local-dir:" + str(path), None, path
    path = local_path("clip", spec)
    if path is not None:
        return "local-dir:" + str(path), None, path
    if ":" in spec:
        arch, tag = spec.split(":", 1)
        return arch, tag, None
    return "hf-hub:" + spec, None, None


def check_clip(spec: str) -> None:
    name, tag, path = _open_clip_spec(spec)
    expected = "an open_clip model (open_clip_config.json with model_cfg, plus a checkpoint)"
    if path is not None:
        config_file = path / "open_clip_config.json"
        if not path.is_dir() or not config_file.is_file():
            found = describe_dir(path) if path.is_dir() else "a file"
            raise InputError(
                f"clip model {str(path)!r}: expected {expected}, found {found}; pass a folder written by open_clip "
                f"or a spec such as {DEFAULT_MODELS['clip']!r}"
            )
        if "model_cfg" not in read_json(config_file):
            raise InputError(f"clip model {str(path)!r}: {config_file} has no model_cfg; expected {expected}")
        if not any(any(path.glob(pattern)) for pattern in OPEN_CLIP_CHECKPOINTS):
            raise InputError(
                f"clip model {str(path)!r} has no checkpoint (*.safetensors, *.bin, *.pth): expected {expected}; "
                "copy the weights next to open_clip_config.json"
            )
    elif name.startswith("hf-hub:"):
        if "/" not in name:
            raise InputError(
                f"clip model {spec!r} is neither a local folder nor a hub id (ORG/NAME): expected e.g. "
                f"{DEFAULT_MODELS['clip']!r} or ARCH:TAG such as 'ViT-H-14:laion2b_s32b_b79k'"
            )
        config = hub_json("clip", name.removeprefix("hf-hub:"), "open_clip_config.json")
        if config is not None and "model_cfg" not in config:
            raise InputError(f"clip model {spec!r}: its open_clip_config.json has no model_cfg; expected {expected}")
    else:
        if name not in open_clip.list_models():
            raise InputError(
                f"clip model {spec!r}: {name!r} is not an open_clip architecture; expected ARCH:TAG with ARCH one "
                f"of open_clip.list_models() (e.g. 'ViT-H-14:laion2b_s32b_b79k') or {DEFAULT_MODELS['clip']!r}"
            )
        tags = open_clip.list_pretrained_tags_by_model(name)
        if tag not in tags and not Path(tag).expanduser().is_file():
            raise InputError(
                f"clip model {spec!r}: {tag!r} is neither a pretrained tag of {name} ({', '.join(tags) or 'none'}) "
                "nor a checkpoint file; fix the tag or the path"
            )


def _hps_source(metric: str, spec: str, download: bool) -> tuple[str, Path | None, str]:
    """(open_clip model name, checkpoint path or None when not downloaded, model id) of an HPS spec.

    A spec is a hub repo holding the metric's checkpoint file (default ``xswu/HPSv2``), a local folder holding it
    (with an open_clip_config.json for another architecture than ViT-H-14), or the checkpoint file itself.
    """
    filename = HPS_CHECKPOINTS[metric]
    path = local_path(metric, spec)
    if path is None:
        checkpoint = hub_file(metric, spec, filename) if download else None
        return HPS_ARCH, checkpoint, f"{spec}/{filename} (open_clip {HPS_ARCH})"
    if path.is_file():
        _check_hps_version(metric, path.name)
        return HPS_ARCH, path, f"{path} (open_clip {HPS_ARCH})"
    checkpoint = path / filename
    if not checkpoint.is_file():
        found = sorted(p.name for p in path.glob("*.pt")) or "none"
        raise InputError(
            f"{metric} model folder {str(path)!r} has no {filename} (found .pt files: {found}): {metric} needs the "
            f"HPS {'v2.1' if metric == 'hpsv21' else 'v2'} checkpoint; v2 and v2.1 scores are not comparable, so the "
            "file name must match the metric"
        )
    config = path / "open_clip_config.json"
    if config.is_file():
        if "model_cfg" not in read_json(config):
            raise InputError(f"{metric} model {str(path)!r}: {config} has no model_cfg; expected an open_clip config")
        return "local-dir:" + str(path), checkpoint, str(checkpoint)
    return HPS_ARCH, checkpoint, f"{checkpoint} (open_clip {HPS_ARCH})"


def _check_hps_version(metric: str, name: str) -> None:
    is_v21 = "2.1" in name or "2_1" in name
    if is_v21 != (metric == "hpsv21"):
        other = "hpsv21" if is_v21 else "hpsv2"
        raise InputError(
            f"{metric} model {name!r} looks like an HPS {'v2.1' if is_v21 else 'v2'} checkpoint: score it as "
            f"{other}, or pass {HPS_CHECKPOINTS[metric]} for {metric} (v2 and v2.1 scores are not comparable)"
        )


def check_hps(metric: str, spec: str) -> None:
    _hps_source(metric, spec, download=False)


def prefetch_hps(metric: str, spec: str) -> None:
    _hps_source(metric, spec, download=True)


# ----------------------------------------------------------------------------------------------------------------
# Loading


def open_clip_precision(metric: str, dtype: torch.dtype) -> str:
    precision = OPEN_CLIP_PRECISION.get(str(dtype).removeprefix("torch."))
    if precision is None:
        raise InputError(f"{metric} dtype {dtype}: expected one of float32, float16, bfloat16")
    return precision


def load_pickscore(spec: str, device: str, dtype: torch.dtype, processor: str | None = None,
                    text_cache_size: int = TEXT_CACHE_SIZE) -> Scorer:
    path = local_path("pickscore", spec)
    if processor is None:
        processor = spec if path is not None and _has_processor_config(path) else PICKSCORE_PROCESSOR
    else:
        _check_processor(processor)
    logger.info("loading pickscore model %s (processor %s) on %s as %s", spec, processor, device, dtype)
    model = AutoModel.from_pretrained(spec, dtype=dtype).to(device).eval()
    return PickScoreScorer(model, AutoProcessor.from_pretrained(processor), spec, device, dtype, text_cache_size)


def load_clip(spec: str, device: str, dtype: torch.dtype, text_cache_size: int = TEXT_CACHE_SIZE) -> Scorer:
    name, tag, _ = _open_clip_spec(spec)
    precision = open_clip_precision("clip", dtype)
    logger.info("loading clip model %s on %s as %s", spec, device, dtype)
    model, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=tag, precision=precision, device=device
    )
    tokenizer = open_clip.get_tokenizer(name)
    return ClipScorer(model.eval(), preprocess, tokenizer, spec, device, dtype, text_cache_size)


def load_hps(metric: str, spec: str, device: str, dtype: torch.dtype) -> Scorer:
    name, checkpoint, model_id = _hps_source(metric, spec, download=True)
    precision = open_clip_precision(metric, dtype)
    logger.info("loading %s: %s on %s as %s", metric, model_id, device, dtype)
    # open_clip warns that the model is "initialized randomly": the HPS weights are loaded right after.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        model = open_clip.create_model(name, load_weights=False, precision=precision, device=device)
    finally:
        logging.disable(previous)
    try:
        # Every weight of the model must come from the checkpoint; extra entries of HPS's open_clip fork are ignored.
        missing, unexpected = model.load_state_dict(read_state_dict(checkpoint), strict=False)
    except RuntimeError as err:
        missing, unexpected = [str(err)[:400]], []
    if missing:
        raise InputError(f"{metric} checkpoint {checkpoint} does not fit open_clip {name} (missing or misshapen: "
                         f"{missing[:5]}); pass an HPS checkpoint for this architecture")
    if unexpected:
        logger.warning("%s: ignored %d checkpoint entries the model does not use: %s", metric, len(unexpected),
                       unexpected[:5])
    settings = open_clip.get_model_preprocess_cfg(model)
    size = settings["size"] if isinstance(settings["size"], int) else settings["size"][0]
    transform = LongSideTransform(size, tuple(settings["mean"]), tuple(settings["std"]))
    return HpsScorer(metric, model.eval(), transform, open_clip.get_tokenizer(name),
                     f"{model_id}, long side to {size} and zero-padded", device, dtype)
