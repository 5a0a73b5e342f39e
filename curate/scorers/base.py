"""What every scorer shares: the `Scorer` interface (one float64 per image, image i against caption i), the
per-caption text feature cache, feature normalisation, and the LAION-style MLP head that the aesthetic predictor
and ImageReward both end in."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from lpo.core.errors import InputError

logger = logging.getLogger(__name__)

TEXT_CACHE_SIZE = 100_000
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the image normalisation of OpenAI's CLIP (and of ViTs
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)  # trained to match it: BLIP, the toy world's scorers)
MLP_LAYERS = (0, 2, 4, 6, 7)  # Linear indices of the head (Dropout between the first four)
MLP_KEYS = {f"layers.{i}.{p}" for i in MLP_LAYERS for p in ("weight", "bias")}


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

    def score(self, images: list[Image.Image], captions: list[str]) -> np.ndarray:
        """Score image i against captions[i]; images of any mode and size."""

        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions: pass one caption per image")
        if not images:
            return np.zeros(0, dtype=np.float64)
        rgb = [image if image.mode == "RGB" else image.convert("RGB") for image in images]
        with torch.inference_mode():
            scores = self._score(rgb, list(captions))
        return scores.detach().to("cpu", torch.float64).numpy()

    def _score(self, images: list[Image.Image], captions: list[str]) -> torch.Tensor:
        raise NotImplementedError


def pooled_features(output: Any) -> torch.Tensor:
    """The tensor of a CLIP get_*_features call: transformers 5 returns a ModelOutput, transformers 4 a tensor."""
    return getattr(output, "pooler_output", output)


def normalise(features: torch.Tensor) -> torch.Tensor:
    features = features.float()
    return features / features.norm(dim=-1, keepdim=True)


def laion_mlp_head(state_dict: dict[str, torch.Tensor], source: str, what: str) -> torch.nn.Module:
    """The 5-linear MLP of the LAION aesthetic predictor and of ImageReward (Linear, Dropout, Linear, Dropout,
    Linear, Dropout, Linear, Linear; no activations), sized from its weights (`layers.{0,2,4,6,7}.*`)."""

    if set(state_dict) != MLP_KEYS:
        raise InputError(
            f"{source}: expected the {what} MLP keys {sorted(MLP_KEYS)}, found {sorted(state_dict)[:12]}; pass the "
            f"original {what} weights"
        )
    linear = {}
    for i in MLP_LAYERS:
        out_features, in_features = state_dict[f"layers.{i}.weight"].shape
        linear[i] = torch.nn.Linear(in_features, out_features)
    layers = torch.nn.Sequential(
        linear[0], torch.nn.Dropout(0.2), linear[2], torch.nn.Dropout(0.2), linear[4], torch.nn.Dropout(0.1),
        linear[6], linear[7],
    )
    try:
        layers.load_state_dict({k.removeprefix("layers."): v.float() for k, v in state_dict.items()})
    except RuntimeError as err:
        raise InputError(f"{source}: the {what} MLP's layer shapes do not chain ({err}); re-export it") from None
    return layers


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a torch checkpoint (read with weights_only; a `state_dict` entry and a
    DataParallel `module.` prefix are unwrapped)."""

    if path.suffix == ".safetensors":
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


def score_each(scorer: Any, images: Sequence[Image.Image | None], captions: Sequence[str],
               errors: Sequence[str | None]) -> tuple[list[float | None], list[str | None]]:
    """Scores and errors of a batch whose undecodable images are None (their `errors` say why). The others are
    scored in one call; if the model rejects the batch, one by one, so only the image it rejects gets an error.
    `scorer` is anything with `score(images, captions)` and `name` (a local scorer or a served one)."""
    good = [i for i, image in enumerate(images) if image is not None]
    scores: list[float | None] = [None] * len(images)
    errors = list(errors)
    if not good:
        return scores, errors
    try:
        values = scorer.score([images[i] for i in good], [captions[i] for i in good])
        for i, value in zip(good, values, strict=True):
            scores[i] = float(value)
    except Exception as err:  # isolate the image the model rejects
        logger.warning("%s: batch failed (%s); retrying one image at a time", scorer.name, err)
        for i in good:
            try:
                scores[i] = float(scorer.score([images[i]], [captions[i]])[0])
            except Exception as single:
                errors[i] = f"{scorer.name} failed: {type(single).__name__}: {single}"
    return scores, errors
