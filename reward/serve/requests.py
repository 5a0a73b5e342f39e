"""Request decoders of `lpo reward serve`: they run in the inference worker, one request at a time, and raise
`Rejected` naming the first problem (the LitAPIs return it instead of failing the batch)."""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load

from lpo.reward.serve.protocol import (
    DRM_OPTIONAL,
    DRM_ROUTE,
    DRM_TENSORS,
    IMAGES_ROUTE,
    LATENT_DTYPES,
    LATENTS_ROUTE,
    Rejected,
)

TORCH_DTYPES = {name: getattr(torch, name) for name in LATENT_DTYPES}


@dataclass
class ImageRequest:
    metric: str
    images: list[Any]  # PIL images, as decoded from the sent files
    prompts: list[str]


@dataclass
class LatentRequest:
    latents: torch.Tensor  # [B, C, H, W] in the dtype sent
    timesteps: torch.Tensor  # [B] int64
    prompts: list[str]


@dataclass
class DRMRequest:
    """One protocol-v1 request: a clean latent, its prompt's pipeline encoding, the noise level and seed."""

    latents: torch.Tensor  # [1, C, H, W] float32, clean (VAE-scaled)
    context: torch.Tensor  # [1, L, D] float32: the pipeline's prompt_embeds
    pooled: torch.Tensor  # [1, P] float32: its pooled_prompt_embeds
    u: float  # the noise level, sigma, in [0, 1]
    seed: int | None  # the noise seed; None: the server draws one


def _object(request: Any, fields: set[str], route: str) -> dict[str, Any]:
    if not isinstance(request, dict):
        raise Rejected(422, f"{route} takes a JSON object with fields {sorted(fields)}")
    unknown = sorted(set(request) - fields)
    if unknown:
        raise Rejected(422, f"unknown field(s) {unknown} on {route}; the fields are {sorted(fields)}")
    return request


def _count(n: int, max_items: int, what: str) -> None:
    if n < 1:
        raise Rejected(422, f"no {what} in the request; send at least one")
    if n > max_items:
        raise Rejected(422, f"{n} {what} in one request, over the server's limit of {max_items} "
                            "(--max-items-per-request); split the request (RewardClient does)")


def _prompts(value: Any, n: int, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise Rejected(422, f"prompts must be a list of strings, one per {what}")
    if len(value) != n:
        raise Rejected(422, f"{n} {what}s but {len(value)} prompts; send one prompt per {what}")
    for i, prompt in enumerate(value):
        if not prompt.strip():
            raise Rejected(422, f"prompts[{i}] is empty; every {what} needs a non-empty prompt")
    return value


def _base64(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise Rejected(422, f"{where} must be a base64 string, not {type(value).__name__}")
    if value.startswith("data:"):  # a data URL: data:image/png;base64,....
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as err:
        raise Rejected(422, f"{where} is not valid base64 ({err})") from None


def _image(data: bytes, where: str) -> Any:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise Rejected(422, f"{where} ({len(data)} bytes) is not an image PIL can decode ({type(err).__name__}: "
                            f"{err}); send encoded image files (PNG, JPEG, WebP)") from None
    return image


def decode_images(request: Any, metrics: tuple[str, ...], max_items: int) -> ImageRequest:
    """Validate and decode one /score/images request; raise Rejected naming the first problem."""
    request = _object(request, {"metric", "images", "prompts"}, IMAGES_ROUTE)
    metric = request.get("metric")
    if not isinstance(metric, str) or not metric:
        raise Rejected(422, f"metric is missing; this server scores {', '.join(metrics)}")
    if metric not in metrics:
        raise Rejected(422, f"unknown metric {metric!r}: this server scores {', '.join(metrics)} (GET /models)")
    images = request.get("images")
    if not isinstance(images, list):
        raise Rejected(422, "images must be a list of base64-encoded image files")
    _count(len(images), max_items, "images")
    prompts = _prompts(request.get("prompts"), len(images), "image")
    decoded = [_image(_base64(value, f"images[{i}]"), f"images[{i}]") for i, value in enumerate(images)]
    return ImageRequest(metric, decoded, prompts)


def _safetensors(data: bytes, where: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        tensors = load(data)
        header_size = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8:8 + header_size]).get("__metadata__") or {}
    except Exception as err:  # safetensors raises its own error type; any failure means "not a safetensors file"
        raise Rejected(422, f"{where} is not a readable safetensors file ({type(err).__name__}: {err})") from None
    return tensors, metadata


def _raw_latents(spec: Any) -> torch.Tensor:
    if not isinstance(spec, dict):
        raise Rejected(422, "latents must be an object: {\"data\": base64, \"shape\": [B, C, H, W], \"dtype\": "
                            "\"float32\"} or {\"safetensors\": base64}")
    if set(spec) == {"safetensors"}:
        tensors, _ = _safetensors(_base64(spec["safetensors"], "latents.safetensors"), "latents.safetensors")
        if "latents" not in tensors and len(tensors) != 1:
            raise Rejected(422, f"latents.safetensors holds {sorted(tensors)}; store one tensor named latents")
        return tensors.get("latents") if "latents" in tensors else next(iter(tensors.values()))
    if set(spec) != {"data", "shape", "dtype"}:
        raise Rejected(422, f"latents has fields {sorted(spec)}; send data, shape and dtype (or safetensors)")
    dtype = TORCH_DTYPES.get(spec["dtype"]) if isinstance(spec["dtype"], str) else None
    if dtype is None:
        raise Rejected(422, f"latents dtype {spec['dtype']!r} is not accepted; send {', '.join(LATENT_DTYPES)}")
    shape = spec["shape"]
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                                              for s in shape):
        raise Rejected(422, f"latents shape {shape!r} must be a list of positive integers, [B, C, H, W]")
    data = _base64(spec["data"], "latents.data")
    needed = dtype.itemsize * int(torch.Size(shape).numel())
    if len(data) != needed:
        raise Rejected(422, f"latents.data has {len(data)} bytes but shape {shape} in {spec['dtype']} needs {needed} "
                            "(raw little-endian, C order)")
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)


def _timesteps(value: Any, n: int, num_timesteps: int, continuous: bool = False) -> torch.Tensor:
    """One timestep per latent: integers in [0, num_timesteps - 1] (DDPM families), or numbers in [0, num_timesteps]
    (flow matching: sigma x num_timesteps)."""
    kind = "numbers" if continuous else "integers"
    dtype = torch.float32 if continuous else torch.long

    def accepted(t: Any) -> bool:
        return isinstance(t, (int, float) if continuous else int) and not isinstance(t, bool)

    if accepted(value):
        value = [value] * n
    if torch.is_tensor(value):
        if (value.dtype.is_floating_point and not continuous) or value.dtype == torch.bool or value.dim() > 1:
            raise Rejected(422, f"timesteps tensor is {value.dtype} of shape {list(value.shape)}; send [B] {kind}")
        steps = value.to(dtype).expand(n) if value.dim() == 0 else value.to(dtype)
    elif isinstance(value, list) and all(accepted(t) for t in value):
        steps = torch.tensor(value, dtype=dtype)
    else:
        raise Rejected(422, f"timesteps must be one of {kind} or a list of {kind}, one per latent")
    if steps.numel() != n:
        raise Rejected(422, f"{n} latents but {steps.numel()} timesteps; send one timestep per latent")
    high = num_timesteps if continuous else num_timesteps - 1
    if steps.numel() and not (0 <= float(steps.min()) and float(steps.max()) <= high):
        raise Rejected(422, f"timesteps {steps.tolist()} go outside [0, {high}]")
    return steps


def decode_latents(request: Any, latent_shape: tuple[int, int, int], num_timesteps: int,
                   max_items: int, continuous: bool = False) -> LatentRequest:
    """Validate and decode one /score/latents request; raise Rejected naming the first problem."""
    request = _object(request, {"latents", "timesteps", "prompts", "safetensors"}, LATENTS_ROUTE)
    if "safetensors" in request and "latents" in request:
        raise Rejected(422, "the request has both safetensors and latents; send the latents one way")
    if "safetensors" in request:
        tensors, metadata = _safetensors(_base64(request["safetensors"], "the safetensors body"), "the body")
        latents = tensors.get("latents")
        timesteps = request.get("timesteps", tensors.get("timesteps"))
        prompts = request.get("prompts")
        if prompts is None and "prompts" in metadata:
            try:
                prompts = json.loads(metadata["prompts"])
            except ValueError:
                raise Rejected(422, "the safetensors metadata 'prompts' is not a JSON list of strings") from None
        if latents is None:
            raise Rejected(422, f"the safetensors body holds {sorted(tensors)}; store the latents as 'latents'")
    elif "latents" in request:
        latents = _raw_latents(request["latents"])
        timesteps, prompts = request.get("timesteps"), request.get("prompts")
    else:
        raise Rejected(422, "latents are missing; send latents (data, shape, dtype) with timesteps and prompts, or a "
                            "safetensors body")
    if latents.dtype not in TORCH_DTYPES.values():
        raise Rejected(422, f"latents dtype {str(latents.dtype).removeprefix('torch.')} is not accepted; send "
                            f"{', '.join(LATENT_DTYPES)}")
    if latents.dim() != 4 or tuple(latents.shape[1:]) != tuple(latent_shape):
        expected = ", ".join(map(str, latent_shape))
        raise Rejected(422, f"latents have shape {list(latents.shape)}; this model takes [B, {expected}] "
                            "(GET /models)")
    _count(latents.shape[0], max_items, "latents")
    if timesteps is None:
        raise Rejected(422, "timesteps are missing; send one timestep per latent")
    steps = _timesteps(timesteps, latents.shape[0], num_timesteps, continuous)
    prompts = _prompts(prompts, latents.shape[0], "latent")
    if not bool(torch.isfinite(latents).all()):
        raise Rejected(422, "latents hold NaN or infinite values")
    return LatentRequest(latents, steps, prompts)


def decode_drm(request: Any, latent_shape: tuple[int, int, int], context_shape: tuple[int | None, int],
               pooled_width: int) -> DRMRequest:
    """Validate and decode one protocol-v1 request (the gateway has checked its version header and wrapped its
    safetensors body as {"safetensors": base64}); raise Rejected naming the first problem. `context_shape` is
    [L, D] with L None where any sequence length is taken."""
    request = _object(request, {"safetensors"}, DRM_ROUTE)
    tensors, _ = _safetensors(_base64(request.get("safetensors"), "the safetensors body"), "the body")
    missing = sorted(set(DRM_TENSORS) - set(tensors))
    unknown = sorted(set(tensors) - set(DRM_TENSORS) - set(DRM_OPTIONAL))
    if missing or unknown:
        raise Rejected(422, f"the body holds tensors {sorted(tensors)}; protocol v1 takes "
                            f"{', '.join(DRM_TENSORS)} and optionally seeds" +
                       (f" (missing: {', '.join(missing)})" if missing else "") +
                       (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    for name, rank in {**DRM_TENSORS, **{k: v for k, v in DRM_OPTIONAL.items() if k in tensors}}.items():
        value = tensors[name]
        if value.dim() != rank:
            raise Rejected(422, f"{name} has shape {list(value.shape)} (rank {value.dim()}); protocol v1 sends it "
                                f"with rank {rank}, the batch first")
        if value.shape[0] != 1:
            raise Rejected(422, f"{name} has batch size {value.shape[0]}; protocol v1 scores one sample per request")
    for name in DRM_TENSORS:
        if tensors[name].dtype not in TORCH_DTYPES.values():
            raise Rejected(422, f"{name} is {str(tensors[name].dtype).removeprefix('torch.')}; send "
                                f"{', '.join(LATENT_DTYPES)}")
        if not bool(torch.isfinite(tensors[name]).all()):
            raise Rejected(422, f"{name} holds NaN or infinite values")
    latents, context, pooled = tensors["latents"], tensors["prompt_embeds"], tensors["pooled_prompt_embeds"]
    if tuple(latents.shape[1:]) != tuple(latent_shape):
        raise Rejected(422, f"latents have shape {list(latents.shape)}; this model takes [1, "
                            f"{', '.join(map(str, latent_shape))}] (GET /models)")
    length, width = context_shape
    if context.shape[2] != width or (length is not None and context.shape[1] != length):
        wanted = f"[1, {length if length is not None else 'L'}, {width}]"
        raise Rejected(422, f"prompt_embeds have shape {list(context.shape)}; this model takes {wanted}, the base "
                            "pipeline's encode_prompt output at its default max_sequence_length (GET /models)")
    if pooled.shape[1] != pooled_width:
        raise Rejected(422, f"pooled_prompt_embeds have shape {list(pooled.shape)}; this model takes "
                            f"[1, {pooled_width}] (GET /models)")
    u = float(tensors["u"][0])
    if not 0.0 <= u <= 1.0:
        raise Rejected(422, f"u = {u} is outside [0, 1]; u is the noise level sigma the latent is scored at")
    seed = None
    if "seeds" in tensors:
        seeds = tensors["seeds"]
        if seeds.dtype != torch.int64:
            raise Rejected(422, f"seeds is {str(seeds.dtype).removeprefix('torch.')}; send one int64")
        seed = int(seeds[0])
    return DRMRequest(latents.float(), context.float(), pooled.float(), u, seed)
