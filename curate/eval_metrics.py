"""Evaluation metrics: the curation scorers plus HPSv2, HPSv2.1 and ImageReward, behind one registry.

Each metric gives one float64 per image (image i against caption i) on the scale of the published tables
(design/field.md section 5):

- ``pickscore``: ``exp(logit_scale) * cos`` of PickScore_v1 (about 20-23), as in `curate.scorers`.
- ``hpsv2`` / ``hpsv21``: ``100 * cos`` of open_clip ViT-H-14 with the HPS v2 / v2.1 checkpoint
  (``xswu/HPSv2``: ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt``); the raw cosine times 100, as the HPS and
  LPO tables print it (about 24-32). Two metric names because the two versions are not comparable.
- ``imagereward``: ``(MLP(BLIP [CLS]) - 0.16717362830052426) / 1.0333394966054072``: the BLIP text encoder
  cross-attending to the BLIP ViT image tokens, its [CLS] feature through the 5-layer MLP, normalised with the
  constants of the ImageReward authors (about N(0, 1)).
- ``aesthetic``, ``clip`` (raw cosine of LAION ViT-H-14, as LPO's filter), ``vqa``: as in `curate.scorers`.

HPS runs on open_clip directly (the ``hpsv2`` package pins pytest 7.2 and protobuf < 4). ImageReward runs on stock
pieces: timm's VisionTransformer (the BLIP ViT's parameter layout) and transformers' BlipTextModel (BLIP's
``med.py`` encoder), loading ``ImageReward.pt`` strictly; the ``image-reward`` package pins timm 0.6.13 and imports
functions transformers 5 removed, so it is not used.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from curate import scorers
from curate.errors import InputError
from curate.scorers import ClipScorer, Scorer

if TYPE_CHECKING:
    import PIL.Image
    import torch

logger = logging.getLogger(__name__)

EVAL_METRICS: tuple[str, ...] = ("pickscore", "hpsv2", "hpsv21", "imagereward", "aesthetic", "clip", "vqa")
# The metrics of the LPO paper's Pick-a-Pic table (design/field.md section 6).
DEFAULT_EVAL_METRICS: tuple[str, ...] = ("pickscore", "hpsv2", "hpsv21", "imagereward", "aesthetic")
HPS_REPO = "xswu/HPSv2"
HPS_ARCH = "ViT-H-14"
HPS_CHECKPOINTS = {"hpsv2": "HPS_v2_compressed.pt", "hpsv21": "HPS_v2.1_compressed.pt"}
HPS_SCALE = 100.0
IMAGEREWARD_REPO = "THUDM/ImageReward"
IMAGEREWARD_CHECKPOINT = "ImageReward.pt"
IMAGEREWARD_MED_CONFIG = "med_config.json"
IMAGEREWARD_TOKENIZER = "bert-base-uncased"
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
IMAGEREWARD_TEXT_LENGTH = 35
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# BLIP ViT-L/16 at 224 px, the image encoder of ImageReward.
BLIP_VIT_LARGE = {"image_size": 224, "patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16}
EVAL_EXTRA_HINT = "pip install 'lpo[eval]'"
DEFAULT_EVAL_MODELS: dict[str, str] = {
    **scorers.DEFAULT_MODELS, "hpsv2": HPS_REPO, "hpsv21": HPS_REPO, "imagereward": IMAGEREWARD_REPO,
}
_MLP_KEYS = {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}


def _check_metric(metric: str) -> None:
    if metric not in EVAL_METRICS:
        raise InputError(f"unknown metric {metric!r}: expected one of {', '.join(EVAL_METRICS)}; fix the metric name")


def _hub_file(metric: str, repo: str, filename: str) -> Path:
    """A file of a hub repo from the local cache or the Hub; InputError naming the download when unavailable."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename))
    except Exception as err:  # offline, missing file, gated, bad id: all mean the same fix
        raise InputError(
            f"{metric} needs {filename} from the Hub repo {repo!r}, which could not be read ({type(err).__name__}); "
            f"download it (`hf download {repo} {filename}`) or pass a local folder with --{metric}-model"
        ) from None


def _is_hub_id(spec: str) -> bool:
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~"))


def _local(metric: str, spec: str) -> Path | None:
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if not _is_hub_id(spec):
        raise InputError(
            f"{metric} model {spec!r} is neither an existing path nor a hub id (ORG/NAME): expected e.g. "
            f"{DEFAULT_EVAL_MODELS[metric]!r} or a local folder; fix the path"
        )
    return None


# ----------------------------------------------------------------------------------------------------------------
# HPS v2 / v2.1


def _hps_source(metric: str, spec: str, download: bool) -> tuple[str, Path | None, str]:
    """(open_clip model name, checkpoint path or None when not downloaded, model id) of an HPS spec.

    A spec is a hub repo holding the metric's checkpoint file (default ``xswu/HPSv2``), a local folder holding it
    (with an open_clip_config.json for another architecture than ViT-H-14), or the checkpoint file itself.
    """
    filename = HPS_CHECKPOINTS[metric]
    path = _local(metric, spec)
    if path is None:
        checkpoint = _hub_file(metric, spec, filename) if download else None
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
        if "model_cfg" not in scorers._read_json(config):
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


class HpsScorer(ClipScorer):
    """HPS v2 / v2.1: 100 x the cosine of normalised open_clip image and text features."""

    def __init__(self, metric: str, model: Any, preprocess: Callable, tokenizer: Callable, model_id: str,
                 device: str, dtype: torch.dtype) -> None:
        super().__init__(model, preprocess, tokenizer, model_id, device, dtype)
        self.name = metric
        version = "v2.1" if metric == "hpsv21" else "v2"
        self.scale = f"100 x cosine (HPS {version}, as the HPS/LPO tables print it; ~24-32 for real images)"

    def _score(self, images: list[PIL.Image.Image], captions: list[str]) -> torch.Tensor:
        return HPS_SCALE * super()._score(images, captions)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise InputError(f"cannot read the checkpoint {path}: {err}; expected a torch state dict") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InputError(f"{path} holds a {type(state).__name__}, not a state dict; pass the original checkpoint")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_hps(metric: str, spec: str, device: str, dtype: torch.dtype) -> Scorer:
    import open_clip

    name, checkpoint, model_id = _hps_source(metric, spec, download=True)
    precision = scorers._OPEN_CLIP_PRECISION.get(str(dtype).removeprefix("torch."))
    if precision is None:
        raise InputError(f"{metric} dtype {dtype}: expected one of float32, float16, bfloat16")
    logger.info("loading %s: %s on %s as %s", metric, model_id, device, dtype)
    # open_clip warns that the model is "initialized randomly": the HPS weights are loaded right after.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, load_weights=False, precision=precision,
                                                                     device=device)
    finally:
        logging.disable(previous)
    try:
        # Every weight of the model must come from the checkpoint; extra entries of HPS's open_clip fork are ignored.
        missing, unexpected = model.load_state_dict(_read_state_dict(checkpoint), strict=False)
    except RuntimeError as err:
        missing, unexpected = [str(err)[:400]], []
    if missing:
        raise InputError(f"{metric} checkpoint {checkpoint} does not fit open_clip {name} (missing or misshapen: "
                         f"{missing[:5]}); pass an HPS checkpoint for this architecture")
    if unexpected:
        logger.warning("%s: ignored %d checkpoint entries the model does not use: %s", metric, len(unexpected),
                       unexpected[:5])
    return HpsScorer(metric, model.eval(), preprocess, open_clip.get_tokenizer(name), model_id, device, dtype)


# ----------------------------------------------------------------------------------------------------------------
# ImageReward


def normalise_imagereward(raw: torch.Tensor) -> torch.Tensor:
    """ImageReward's standardisation of the MLP output, with its authors' constants."""
    return (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


class ImageRewardScorer(Scorer):
    """ImageReward: BLIP text [CLS] cross-attending to the image -> MLP -> standardised."""

    def __init__(self, vision: torch.nn.Module, text_encoder: torch.nn.Module, head: torch.nn.Module, tokenizer: Any,
                 image_size: int, model_id: str, device: str, dtype: torch.dtype) -> None:
        from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

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

    def features(self, images: list[PIL.Image.Image], captions: list[str]) -> torch.Tensor:
        """The text encoder's [CLS] feature for each (image, caption), before the MLP."""
        import torch

        pixels = torch.stack([self.transform(image) for image in images]).to(self.device, self.dtype)
        image_embeds = self.vision.forward_features(pixels)
        tokens = self.tokenizer(captions, padding="max_length", truncation=True, max_length=IMAGEREWARD_TEXT_LENGTH,
                                return_tensors="pt").to(self.device)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text_encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                                encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask)
        return out.last_hidden_state[:, 0].float()

    def _score(self, images: list[PIL.Image.Image], captions: list[str]) -> torch.Tensor:
        return normalise_imagereward(self.head(self.features(images, captions))[:, 0])


def _imagereward_files(spec: str, download: bool) -> tuple[dict[str, Any], Path | None, Path | None, str]:
    """(lpo config, checkpoint, med config, model id); the files are None for a hub id when not downloaded."""
    path = _local("imagereward", spec)
    if path is None:
        if not download:
            return {}, None, None, spec
        return ({}, _hub_file("imagereward", spec, IMAGEREWARD_CHECKPOINT),
                _hub_file("imagereward", spec, IMAGEREWARD_MED_CONFIG), spec)
    expected = (f"a folder with {IMAGEREWARD_CHECKPOINT} and {IMAGEREWARD_MED_CONFIG} (a copy of "
                f"{IMAGEREWARD_REPO})")
    if not path.is_dir():
        raise InputError(f"imagereward model {str(path)!r} is a file: expected {expected}")
    config: dict[str, Any] = {}
    if (path / "config.json").is_file():
        config = scorers._read_json(path / "config.json")
        if config.get("lpo_scorer") != "imagereward":
            raise InputError(f"imagereward model {str(path)!r}: expected {expected}, found "
                             f"{scorers._describe_dir(path)}; pass such a folder or {IMAGEREWARD_REPO!r}")
    files = [path / config.get("checkpoint", IMAGEREWARD_CHECKPOINT), path / config.get("med_config",
                                                                                           IMAGEREWARD_MED_CONFIG)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise InputError(f"imagereward model {str(path)!r} lacks {missing}: expected {expected}")
    tokenizer = config.get("tokenizer")
    if tokenizer is not None:
        config["tokenizer"] = scorers._resolve_relative(path, tokenizer)
    return config, files[0], files[1], str(path)


def _require_timm(metric: str) -> None:
    if importlib.util.find_spec("timm") is None:
        raise InputError(f"{metric} needs the timm package (its BLIP image encoder), which is not installed: run "
                         f"`{EVAL_EXTRA_HINT}`")


def _mlp_head(state: dict[str, torch.Tensor], source: str) -> torch.nn.Module:
    """The 5-linear MLP of ImageReward (Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear)."""
    import torch

    if set(state) != _MLP_KEYS:
        raise InputError(f"{source}: expected the ImageReward MLP keys mlp.layers.{{0,2,4,6,7}}, found "
                         f"{sorted(state)[:10]}; pass the original ImageReward.pt")
    shapes = {i: state[f"layers.{i}.weight"].shape for i in (0, 2, 4, 6, 7)}
    linear = {i: torch.nn.Linear(shape[1], shape[0]) for i, shape in shapes.items()}
    head = torch.nn.Sequential(linear[0], torch.nn.Dropout(0.2), linear[2], torch.nn.Dropout(0.2), linear[4],
                               torch.nn.Dropout(0.1), linear[6], linear[7])
    try:
        head.load_state_dict({k.removeprefix("layers."): v.float() for k, v in state.items()})
    except RuntimeError as err:
        raise InputError(f"{source}: the MLP layer shapes do not chain ({err})") from None
    return head


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


def _load_imagereward(spec: str, device: str, dtype: torch.dtype) -> Scorer:
    import torch
    from timm.models.vision_transformer import VisionTransformer
    from transformers import AutoTokenizer, BlipTextConfig, BlipTextModel

    config, checkpoint, med_file, model_id = _imagereward_files(spec, download=True)
    vision_cfg = {**BLIP_VIT_LARGE, **config.get("vision", {})}
    med = scorers._read_json(med_file)
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
    state = _read_state_dict(checkpoint)
    source = f"imagereward checkpoint {checkpoint}"
    _load_part(vision, state, "blip.visual_encoder.", source)
    # BLIP's med.py stores position_ids as a buffer; transformers rebuilds it.
    _load_part(text_encoder, state, "blip.text_encoder.", source, skip=("embeddings.position_ids",))
    head = _mlp_head({k.removeprefix("mlp."): v for k, v in state.items() if k.startswith("mlp.")}, source)
    if head[0].in_features != text_config.hidden_size:
        raise InputError(f"{source}: the MLP takes {head[0].in_features}-d features but the text encoder is "
                         f"{text_config.hidden_size}-d; pair ImageReward.pt with its own med_config.json")
    tokenizer = AutoTokenizer.from_pretrained(config.get("tokenizer", IMAGEREWARD_TOKENIZER))
    vision = vision.to(device, dtype).eval()
    text_encoder = text_encoder.to(device, dtype).eval()
    return ImageRewardScorer(vision, text_encoder, head.to(device).eval(), tokenizer, vision_cfg["image_size"],
                             model_id, device, dtype)


# ----------------------------------------------------------------------------------------------------------------
# Registry


def check_eval_spec(metric: str, spec: str) -> None:
    """Validate a metric name and model spec before any weights load; InputError when unusable."""
    _check_metric(metric)
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"{metric} model spec {spec!r} is empty: expected a local path or a hub id such as "
                         f"{DEFAULT_EVAL_MODELS[metric]!r}")
    if metric in HPS_CHECKPOINTS:
        _hps_source(metric, spec, download=False)
    elif metric == "imagereward":
        _require_timm(metric)
        _imagereward_files(spec, download=False)
    else:
        scorers.check_model_spec(metric, spec)


def prefetch(metric: str, spec: str) -> None:
    """Download the hub files an HPS or ImageReward spec needs now, so an unavailable checkpoint stops a run before
    its images are generated rather than after."""
    if metric in HPS_CHECKPOINTS:
        _hps_source(metric, spec, download=True)
    elif metric == "imagereward":
        config, *_ = _imagereward_files(spec, download=True)
        tokenizer = config.get("tokenizer", IMAGEREWARD_TOKENIZER)
        if not Path(tokenizer).exists():
            from transformers import AutoTokenizer

            try:
                AutoTokenizer.from_pretrained(tokenizer)
            except OSError as err:
                raise InputError(f"imagereward needs the tokenizer {tokenizer!r}, which could not be read ({err}); "
                                 "download it or put a tokenizer folder beside ImageReward.pt") from None


def load_metric(metric: str, spec: str | None = None, *, device: str = "cpu", dtype: torch.dtype | None = None
                ) -> Scorer:
    """Load the scorer of an evaluation metric from `spec` (default DEFAULT_EVAL_MODELS[metric])."""
    import torch

    spec = spec or DEFAULT_EVAL_MODELS[metric]
    check_eval_spec(metric, spec)
    dtype = dtype or torch.float32
    if metric in HPS_CHECKPOINTS:
        return _load_hps(metric, spec, device, dtype)
    if metric == "imagereward":
        return _load_imagereward(spec, device, dtype)
    return scorers.load_scorer(metric, spec, device=device, dtype=dtype)
