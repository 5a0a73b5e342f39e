"""The scorer registry: PickScore, CLIP score, VQAScore and LAION aesthetic behind one `score` call.

Each scorer returns one float64 per image, image i scored against captions[i], with the exact recipe of
design/field.md section 5:

- ``pickscore``: ``exp(logit_scale) * cos(image, text)`` of a transformers CLIPModel (PickScore_v1).
- ``clip``: raw cosine of normalised open_clip embeddings (LAION ViT-H-14, as in LPO's MPCF); no x100, no clamp.
- ``vqa``: VQAScore, P("Yes") for ``Does this figure show "{caption}"? Please answer yes or no.``, computed by
  teacher forcing as exp(sum of the answer tokens' log-probs) after the model's chat prompt.
- ``aesthetic``: the LAION improved aesthetic MLP on the L2-normalised CLIP ViT-L/14 image embedding.

The default VQA model is Qwen/Qwen2.5-VL-7B-Instruct: it runs through the generic transformers path
(AutoModelForImageTextToText + chat template), fits a 24 GB GPU in bf16, and is one of the models t2v_metrics
ships for VQAScore. CLIP-FlanT5-XXL, the model of the VQAScore paper and of LPO's MPCF, needs >= 40 GB and the
legacy ``t2v-metrics==3.0`` release (which pins older torch/transformers), so it is the opt-in ``t2v:`` backend.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from curate.errors import InputError

if TYPE_CHECKING:
    import numpy
    import PIL.Image
    import torch

logger = logging.getLogger(__name__)

METRICS: tuple[str, ...] = ("pickscore", "clip", "vqa", "aesthetic")
DEFAULT_MODELS: dict[str, str] = {
    "pickscore": "yuvalkirstain/PickScore_v1",
    "clip": "hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    "vqa": "Qwen/Qwen2.5-VL-7B-Instruct",
    "aesthetic": "trl-lib/ddpo-aesthetic-predictor",
}
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
AESTHETIC_CLIP_MODEL = "openai/clip-vit-large-patch14"
AESTHETIC_HEAD_FILE = "aesthetic-model.pth"
VQA_QUESTION_TEMPLATE = 'Does this figure show "{}"? Please answer yes or no.'
VQA_ANSWER = "Yes"
T2V_PREFIX = "t2v:"
T2V_INSTALL_HINT = "pip install t2v-metrics==3.0"
TEXT_CACHE_SIZE = 100_000
PICKSCORE_MAX_LENGTH = 77

_OPTIONS: dict[str, set[str]] = {
    "pickscore": {"processor", "text_cache_size"},
    "clip": {"text_cache_size"},
    "vqa": {"question_template", "answer"},
    "aesthetic": {"clip_model", "head_file"},
}
_OPEN_CLIP_CHECKPOINTS = ("*.safetensors", "*.bin", "*.pth", "*.pt")
_AESTHETIC_HEAD_KEYS = {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}


# ----------------------------------------------------------------------------------------------------------------
# Scorers


class TextFeatureCache:
    """Normalised text features keyed by caption; when full, the oldest entries are dropped first.

    Features stay on the model's device in float32 (100k ViT-H captions take about 400 MB).
    """

    def __init__(self, encode: Callable[[list[str]], torch.Tensor], max_entries: int = TEXT_CACHE_SIZE) -> None:
        self.encode = encode
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._features: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._features)

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        """Features for `captions`, one row each; only captions not seen before are encoded (in one batch)."""
        import torch

        found = {c: self._features[c] for c in captions if c in self._features}
        missing = list(dict.fromkeys(c for c in captions if c not in found))
        self.hits += sum(1 for c in captions if c in found)
        if missing:
            self.misses += len(missing)
            found.update(zip(missing, self.encode(missing), strict=True))
            self._features.update((c, found[c]) for c in missing)
            while len(self._features) > self.max_entries:
                del self._features[next(iter(self._features))]
        return torch.stack([found[c] for c in captions])


class Scorer:
    """One metric: `score(images, captions)` gives one float64 per image, image i against captions[i]."""

    name: str
    model_id: str
    scale: str

    def __init__(self, name: str, model_id: str, scale: str, device: str, dtype: torch.dtype) -> None:
        self.name = name
        self.model_id = model_id
        self.scale = scale
        self.device = device
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model_id={self.model_id!r}, device={self.device!r}, dtype={self.dtype})"

    def score(self, images: list[PIL.Image.Image], captions: list[str]) -> numpy.ndarray:
        """Score image i against captions[i]; images of any mode and size."""
        import numpy as np
        import torch

        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions: pass one caption per image")
        if not images:
            return np.zeros(0, dtype=np.float64)
        rgb = [image if image.mode == "RGB" else image.convert("RGB") for image in images]
        with torch.inference_mode():
            scores = self._score(rgb, list(captions))
        return scores.detach().to("cpu", torch.float64).numpy()

    def _score(self, images: list[PIL.Image.Image], captions: list[str]) -> torch.Tensor:
        raise NotImplementedError


def pooled_features(output: Any) -> torch.Tensor:
    """The tensor of a CLIP get_*_features call: transformers 5 returns a ModelOutput, transformers 4 a tensor."""
    return getattr(output, "pooler_output", output)


def _normalise(features: torch.Tensor) -> torch.Tensor:
    features = features.float()
    return features / features.norm(dim=-1, keepdim=True)


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
        return _normalise(pooled_features(self.model.get_text_features(**tokens)))

    def _score(self, images: list[PIL.Image.Image], captions: list[str]) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        image_features = _normalise(pooled_features(self.model.get_image_features(pixel_values=pixels)))
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
        return _normalise(self.model.encode_text(self.tokenizer(captions).to(self.device)))

    def _score(self, images: list[PIL.Image.Image], captions: list[str]) -> torch.Tensor:
        import torch

        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device, self.dtype)
        image_features = _normalise(self.model.encode_image(pixels))
        return (image_features * self.text_features(captions)).sum(-1)


class VqaScorer(Scorer):
    """VQAScore on a transformers vision-language model with a chat template: P(answer | image, question)."""

    def __init__(self, model: Any, processor: Any, model_id: str, device: str, dtype: torch.dtype,
                 question_template: str = VQA_QUESTION_TEMPLATE, answer: str = VQA_ANSWER) -> None:
        super().__init__("vqa", model_id, f"P({answer!r} | image, question), in [0, 1]", device, dtype)
        self.model = model
        self.processor = processor
        self.question_template = question_template
        self.answer = answer
        processor.tokenizer.padding_side = "left"
        # As transformers' apply_chat_template(tokenize=True): add BOS unless the template already starts with it.
        bos = processor.tokenizer.bos_token
        self.add_special_tokens = not (bos and self.prompt("a photo").startswith(bos))
        self.answer_length = self._answer_length()

    def prompt(self, caption: str) -> str:
        """The chat prompt (with generation prompt, without the answer) for one caption."""
        question = self.question_template.format(caption)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _answer_length(self) -> int:
        tokenizer = self.processor.tokenizer
        prompt = self.prompt("a photo")
        prompt_ids = tokenizer(prompt, add_special_tokens=self.add_special_tokens)["input_ids"]
        full_ids = tokenizer(prompt + self.answer, add_special_tokens=self.add_special_tokens)["input_ids"]
        if full_ids[: len(prompt_ids)] != prompt_ids or len(full_ids) == len(prompt_ids):
            raise InputError(
                f"VQA answer {self.answer!r} does not tokenise as the last tokens after the chat prompt of "
                f"{self.model_id}: expected the prompt's tokens followed by the answer's; pick another answer string"
            )
        return len(full_ids) - len(prompt_ids)

    def _score(self, images: list[PIL.Image.Image], captions: list[str]) -> torch.Tensor:
        texts = [self.prompt(caption) + self.answer for caption in captions]
        inputs = self.processor(
            images=images, text=texts, padding=True, add_special_tokens=self.add_special_tokens, return_tensors="pt"
        ).to(self.device)
        inputs = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        n = self.answer_length
        # Left padding puts every answer in the last n positions; the logits before them predict it.
        logits = self.model(**inputs, logits_to_keep=n + 1).logits[:, -n - 1 : -1].float()
        targets = inputs["input_ids"][:, -n:]
        log_probs = logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
        return log_probs.sum(-1).exp()


class T2vVqaScorer(Scorer):
    """VQAScore through the t2v_metrics package (e.g. ``t2v:clip-flant5-xxl``, the model of the paper)."""

    def __init__(self, model_name: str, device: str, dtype: torch.dtype) -> None:
        super().__init__("vqa", T2V_PREFIX + model_name, "P('Yes' | image, question) from t2v_metrics, in [0, 1]",
                         device, dtype)
        import t2v_metrics

        self.t2v = t2v_metrics.VQAScore(model=model_name, device=device)

    def _score(self, images: list[PIL.Image.Image], captions: list[str]) -> torch.Tensor:
        # t2v_metrics takes image paths; batch_forward scores pair i alone (its __call__ scores all M x N pairs).
        with tempfile.TemporaryDirectory(prefix="lpo-t2v-") as tmp:
            paths = [os.path.join(tmp, f"{i}.png") for i in range(len(images))]
            for image, path in zip(images, paths, strict=True):
                image.save(path)
            dataset = [{"images": [path], "texts": [caption]} for path, caption in zip(paths, captions, strict=True)]
            scores = self.t2v.batch_forward(dataset=dataset, batch_size=len(dataset))
        return scores[:, 0, 0].float()


class AestheticScorer(Scorer):
    """LAION improved aesthetic predictor: MLP on the L2-normalised CLIP image embedding (captions unused)."""

    def __init__(self, clip_model: Any, image_processor: Any, head: torch.nn.Module, model_id: str, device: str,
                 dtype: torch.dtype) -> None:
        super().__init__("aesthetic", model_id, "LAION aesthetic, ~1-10 for real images (SD1.5 ~5.5)", device, dtype)
        self.clip_model = clip_model
        self.image_processor = image_processor
        self.head = head

    def _score(self, images: list[PIL.Image.Image], captions: list[str]) -> torch.Tensor:
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        embedding = _normalise(pooled_features(self.clip_model.get_image_features(pixel_values=pixels)))
        return self.head(embedding)[:, 0]


# ----------------------------------------------------------------------------------------------------------------
# Spec validation (no weights are read)


def _is_path_like(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~", ".\\")) or "\\" in spec or spec.count("/") > 1


def _local_path(metric: str, spec: str) -> Path | None:
    """The local path `spec` names, None when it reads as a hub id; a path-like spec that does not exist fails."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if _is_path_like(spec):
        raise InputError(
            f"{metric} model path {spec!r} does not exist: expected a local model directory or a hub id such as "
            f"{DEFAULT_MODELS[metric]!r}; fix the path"
        )
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read {path}: {err}; expected a JSON model config, fix or rewrite the file") from err


def _describe_dir(path: Path) -> str:
    if (path / "model_index.json").is_file():
        return "a diffusers pipeline (model_index.json)"
    if (path / "open_clip_config.json").is_file():
        return "an open_clip model (open_clip_config.json)"
    if (path / "config.json").is_file():
        config = _read_json(path / "config.json")
        if "lpo_scorer" in config:
            return f"an lpo {config['lpo_scorer']!r} scorer folder"
        if "model_type" in config:
            return f"a transformers model of type {config['model_type']!r}"
        if "_class_name" in config:
            return f"a diffusers {config['_class_name']} folder"
        return "a config.json without model_type"
    return "no model config (config.json, open_clip_config.json or model_index.json)"


def _hub_json(metric: str, repo_id: str, filename: str) -> dict | None:
    """`filename` of a hub repo, parsed; None when the hub cannot be reached (the load reports it later)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        path = hf_hub_download(repo_id, filename)
    except GatedRepoError as err:
        raise InputError(
            f"{metric} model {repo_id!r} is gated on the Hugging Face Hub: accept its licence on the model page, "
            "then log in with `hf auth login`"
        ) from err
    except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError) as err:
        raise InputError(
            f"{metric} model {repo_id!r} is neither an existing local path nor a model on the Hub: "
            f"expected e.g. {DEFAULT_MODELS[metric]!r}; fix the name (or log in for a private repo)"
        ) from err
    except RemoteEntryNotFoundError as err:
        raise InputError(
            f"{metric} model {repo_id!r} has no {filename} on the Hugging Face Hub, so it is not a model of the "
            f"expected type; pass a model such as {DEFAULT_MODELS[metric]!r}"
        ) from err
    except (LocalEntryNotFoundError, OSError) as err:
        logger.warning("could not fetch %s of %s to check it (%s); check skipped", filename, repo_id, err)
        return None
    return _read_json(Path(path))


def _check_model_type(metric: str, spec: str, config: dict | None, where: str, expected: str,
                      accept: Callable[[str], bool]) -> None:
    if config is None:
        return
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not accept(model_type):
        found = f"model_type {model_type!r}" if model_type else "no model_type"
        raise InputError(
            f"{metric} model {spec!r}: expected {expected}, found {found} in {where}; "
            f"pass a model such as {DEFAULT_MODELS[metric]!r}"
        )


def _transformers_config(metric: str, spec: str, expected: str, accept: Callable[[str], bool]) -> Path | None:
    """Check that `spec` (local dir or hub id) is a transformers model whose model_type `accept`s."""
    path = _local_path(metric, spec)
    if path is None:
        _check_model_type(metric, spec, _hub_json(metric, spec, "config.json"), "its hub config.json", expected,
                          accept)
        return None
    config_file = path / "config.json"
    if not path.is_dir() or not config_file.is_file() or "model_type" not in _read_json(config_file):
        found = _describe_dir(path) if path.is_dir() else "a file"
        raise InputError(
            f"{metric} model {str(path)!r}: expected {expected} (a folder with config.json), found {found}; "
            f"pass a model such as {DEFAULT_MODELS[metric]!r}"
        )
    _check_model_type(metric, str(path), _read_json(config_file), str(config_file), expected, accept)
    return path


def _check_pickscore(spec: str) -> None:
    _transformers_config("pickscore", spec, "a CLIP model (model_type 'clip')", lambda t: t == "clip")


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
    path = _local_path("clip", spec)
    if path is not None:
        return "local-dir:" + str(path), None, path
    if ":" in spec:
        arch, tag = spec.split(":", 1)
        return arch, tag, None
    return "hf-hub:" + spec, None, None


def _check_clip(spec: str) -> None:
    name, tag, path = _open_clip_spec(spec)
    expected = "an open_clip model (open_clip_config.json with model_cfg, plus a checkpoint)"
    if path is not None:
        config_file = path / "open_clip_config.json"
        if not path.is_dir() or not config_file.is_file():
            found = _describe_dir(path) if path.is_dir() else "a file"
            raise InputError(
                f"clip model {str(path)!r}: expected {expected}, found {found}; pass a folder written by open_clip "
                f"or a spec such as {DEFAULT_MODELS['clip']!r}"
            )
        if "model_cfg" not in _read_json(config_file):
            raise InputError(f"clip model {str(path)!r}: {config_file} has no model_cfg; expected {expected}")
        if not any(any(path.glob(pattern)) for pattern in _OPEN_CLIP_CHECKPOINTS):
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
        config = _hub_json("clip", name.removeprefix("hf-hub:"), "open_clip_config.json")
        if config is not None and "model_cfg" not in config:
            raise InputError(f"clip model {spec!r}: its open_clip_config.json has no model_cfg; expected {expected}")
    else:
        import open_clip

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


def _has_chat_template(path: Path) -> bool:
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    for name in ("processor_config.json", "tokenizer_config.json"):
        if (path / name).is_file() and _read_json(path / name).get("chat_template"):
            return True
    return False


def _check_vqa(spec: str) -> None:
    if spec.startswith(T2V_PREFIX):
        if not spec.removeprefix(T2V_PREFIX):
            raise InputError(f"vqa model {spec!r}: expected t2v:<model>, e.g. 't2v:clip-flant5-xxl'")
        if importlib.util.find_spec("t2v_metrics") is None:
            raise InputError(
                f"vqa model {spec!r} needs the t2v_metrics package, which is not installed: run "
                f"`{T2V_INSTALL_HINT}` (in its own environment: it pins older torch/transformers)"
            )
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    path = _transformers_config(
        "vqa", spec, "a vision-language model loadable with AutoModelForImageTextToText",
        lambda t: t in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )
    if path is not None and not _has_chat_template(path):
        raise InputError(
            f"vqa model {str(path)!r} has no chat template (chat_template.jinja or a chat_template entry): the "
            "generic VQAScore path needs one; use an instruction-tuned model or the t2v:<model> backend"
        )


def _aesthetic_dir_config(path: Path) -> dict:
    config_file = path / "config.json"
    config = _read_json(config_file) if config_file.is_file() else {}
    if config.get("lpo_scorer") != "aesthetic":
        raise InputError(
            f"aesthetic model {str(path)!r}: expected an aesthetic predictor folder (config.json with "
            f"lpo_scorer 'aesthetic', clip_model and head_file), found {_describe_dir(path)}; pass such a folder "
            f"or the hub id {DEFAULT_MODELS['aesthetic']!r}"
        )
    for key in ("clip_model", "head_file"):
        if not isinstance(config.get(key), str):
            raise InputError(f"aesthetic model {str(path)!r}: {config_file} lacks the string field {key!r}")
    return config


def _resolve_relative(base: Path, value: str) -> str:
    candidate = base / value
    return str(candidate) if candidate.exists() else value


def _check_aesthetic(spec: str) -> None:
    path = _local_path("aesthetic", spec)
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
    clip_model = _resolve_relative(path, config["clip_model"])
    _transformers_config("aesthetic", clip_model, "a CLIP model (model_type 'clip')", lambda t: t == "clip")


_CHECKS: dict[str, Callable[[str], None]] = {
    "pickscore": _check_pickscore,
    "clip": _check_clip,
    "vqa": _check_vqa,
    "aesthetic": _check_aesthetic,
}


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise InputError(f"unknown metric {metric!r}: expected one of {', '.join(METRICS)}; fix the metric name")


def check_model_spec(metric: str, spec: str) -> None:
    """Validate a metric name and model spec before any weights load; raise InputError when unusable.

    Local folders are checked from their config files; for a hub id at most a config file is fetched (the check is
    skipped with a warning when the hub cannot be reached).
    """
    _check_metric(metric)
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(
            f"{metric} model spec {spec!r} is empty: expected a local path or a hub id such as "
            f"{DEFAULT_MODELS[metric]!r}"
        )
    _CHECKS[metric](spec)


# ----------------------------------------------------------------------------------------------------------------
# Loading


def _load_pickscore(spec: str, device: str, dtype: torch.dtype, processor: str | None = None,
                    text_cache_size: int = TEXT_CACHE_SIZE) -> Scorer:
    from transformers import AutoModel, AutoProcessor

    path = _local_path("pickscore", spec)
    if processor is None:
        processor = spec if path is not None and _has_processor_config(path) else PICKSCORE_PROCESSOR
    else:
        _check_processor(processor)
    logger.info("loading pickscore model %s (processor %s) on %s as %s", spec, processor, device, dtype)
    model = AutoModel.from_pretrained(spec, dtype=dtype).to(device).eval()
    return PickScoreScorer(model, AutoProcessor.from_pretrained(processor), spec, device, dtype, text_cache_size)


def _has_processor_config(path: Path) -> bool:
    # transformers 5 writes processor_config.json; older versions and most hub repos preprocessor_config.json.
    return (path / "preprocessor_config.json").is_file() or (path / "processor_config.json").is_file()


def _check_processor(processor: str) -> None:
    path = Path(processor).expanduser()
    if (path.exists() or _is_path_like(processor)) and not _has_processor_config(path):
        raise InputError(
            f"pickscore processor {processor!r}: expected a folder with preprocessor_config.json or "
            f"processor_config.json (or a hub id such as {PICKSCORE_PROCESSOR!r}); fix the path"
        )


_OPEN_CLIP_PRECISION = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def _load_clip(spec: str, device: str, dtype: torch.dtype, text_cache_size: int = TEXT_CACHE_SIZE) -> Scorer:
    import open_clip

    name, tag, _ = _open_clip_spec(spec)
    precision = _OPEN_CLIP_PRECISION.get(str(dtype).removeprefix("torch."))
    if precision is None:
        raise InputError(f"clip dtype {dtype}: expected one of float32, float16, bfloat16")
    logger.info("loading clip model %s on %s as %s", spec, device, dtype)
    model, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=tag, precision=precision, device=device
    )
    tokenizer = open_clip.get_tokenizer(name)
    return ClipScorer(model.eval(), preprocess, tokenizer, spec, device, dtype, text_cache_size)


def _load_vqa(spec: str, device: str, dtype: torch.dtype, question_template: str = VQA_QUESTION_TEMPLATE,
              answer: str = VQA_ANSWER) -> Scorer:
    if spec.startswith(T2V_PREFIX):
        return T2vVqaScorer(spec.removeprefix(T2V_PREFIX), device, dtype)
    if "{}" not in question_template:
        raise InputError(
            f"vqa question_template {question_template!r} has no '{{}}' for the caption: expected e.g. "
            f"{VQA_QUESTION_TEMPLATE!r}"
        )
    from transformers import AutoModelForImageTextToText, AutoProcessor

    logger.info("loading vqa model %s on %s as %s", spec, device, dtype)
    processor = AutoProcessor.from_pretrained(spec)
    if getattr(processor, "chat_template", None) is None:
        raise InputError(
            f"vqa model {spec!r} has no chat template: the generic VQAScore path needs one; use an "
            "instruction-tuned model or the t2v:<model> backend"
        )
    model = AutoModelForImageTextToText.from_pretrained(spec, dtype=dtype).to(device).eval()
    return VqaScorer(model, processor, spec, device, dtype, question_template, answer)


def _aesthetic_head(state_dict: dict[str, torch.Tensor], source: str) -> torch.nn.Module:
    """The aesthetic MLP (Linear, Dropout x3 interleaved, Linear, Linear; no activations) sized from the weights."""
    import torch

    if set(state_dict) != _AESTHETIC_HEAD_KEYS:
        raise InputError(
            f"aesthetic head {source}: expected the LAION aesthetic MLP keys {sorted(_AESTHETIC_HEAD_KEYS)}, found "
            f"{sorted(state_dict)[:12]}; pass the head of the improved aesthetic predictor"
        )
    linear = {}
    for i in (0, 2, 4, 6, 7):
        out_features, in_features = state_dict[f"layers.{i}.weight"].shape
        linear[i] = torch.nn.Linear(in_features, out_features)
    layers = torch.nn.Sequential(
        linear[0], torch.nn.Dropout(0.2), linear[2], torch.nn.Dropout(0.2), linear[4], torch.nn.Dropout(0.1),
        linear[6], linear[7],
    )
    try:
        layers.load_state_dict({k.removeprefix("layers."): v.float() for k, v in state_dict.items()})
    except RuntimeError as err:
        raise InputError(f"aesthetic head {source}: layer shapes do not chain ({err}); re-export the head") from err
    return layers


def _read_head(path: Path) -> dict[str, torch.Tensor]:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state)


def _load_aesthetic(spec: str, device: str, dtype: torch.dtype, clip_model: str | None = None,
                    head_file: str | None = None) -> Scorer:
    from transformers import AutoImageProcessor, CLIPModel

    path = _local_path("aesthetic", spec)
    if path is not None:
        config = _aesthetic_dir_config(path)
        head_path = path / (head_file or config["head_file"])
        clip_model = clip_model or _resolve_relative(path, config["clip_model"])
    else:
        from huggingface_hub import hf_hub_download

        head_path = Path(hf_hub_download(spec, head_file or AESTHETIC_HEAD_FILE))
        clip_model = clip_model or AESTHETIC_CLIP_MODEL
    _transformers_config("aesthetic", clip_model, "a CLIP model (model_type 'clip')", lambda t: t == "clip")
    if not head_path.is_file():
        raise InputError(f"aesthetic head file {str(head_path)!r} does not exist: fix head_file")
    logger.info("loading aesthetic head %s on CLIP %s on %s as %s", head_path, clip_model, device, dtype)
    head = _aesthetic_head(_read_head(head_path), str(head_path))
    clip = CLIPModel.from_pretrained(clip_model, dtype=dtype).to(device).eval()
    if head[0].in_features != clip.config.projection_dim:
        raise InputError(
            f"aesthetic head {str(head_path)!r} takes {head[0].in_features}-d embeddings but CLIP {clip_model!r} "
            f"projects to {clip.config.projection_dim}; pair the head with the CLIP it was trained on"
        )
    image_processor = AutoImageProcessor.from_pretrained(clip_model)
    return AestheticScorer(clip, image_processor, head.to(device).eval(), spec, device, dtype)


_LOADERS: dict[str, Callable[..., Scorer]] = {
    "pickscore": _load_pickscore,
    "clip": _load_clip,
    "vqa": _load_vqa,
    "aesthetic": _load_aesthetic,
}


def load_scorer(metric: str, spec: str | None = None, *, device: str = "cpu", dtype: torch.dtype | None = None,
                **options: Any) -> Scorer:
    """Load the scorer for `metric` from `spec` (default DEFAULT_MODELS[metric]) on `device` in `dtype`.

    Options: pickscore ``processor``, ``text_cache_size``; clip ``text_cache_size``; vqa ``question_template``
    (with ``{}`` for the caption), ``answer``; aesthetic ``clip_model``, ``head_file``.
    """
    _check_metric(metric)
    unknown = sorted(set(options) - _OPTIONS[metric])
    if unknown:
        raise InputError(
            f"unknown {metric} scorer option(s) {', '.join(unknown)}: expected "
            f"{', '.join(sorted(_OPTIONS[metric])) or 'none'}; remove or rename them"
        )
    spec = spec or DEFAULT_MODELS[metric]
    check_model_spec(metric, spec)
    import torch

    return _LOADERS[metric](spec, device=device, dtype=dtype or torch.float32, **options)
