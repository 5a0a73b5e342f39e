"""The LitServe side of `lpo reward serve`: the HTTP gateway, the request decoders and one LitAPI per route.

Bad input and batching. LitServe's batched loop decodes every request of a batch, calls `predict` once on the
list, then encodes each output; an exception raised anywhere in that sequence fails *every* request of the batch
with the same error. So nothing here raises for a bad request: `decode_request` validates its own request and
returns a `Rejected` (status and message) instead of the decoded input, `predict` scores the good requests of the
batch together and passes the rejected ones through, and `encode_response` turns a `Rejected` into a JSON error
response with its status. A model failure on a batch is retried request by request, so a request that passes
validation but breaks the model fails alone. What can be checked without a model (the bearer token, the body size,
the content type, malformed JSON or multipart) is answered by the `Gateway` middleware before a request is queued.

The gateway hands LitServe one canonical JSON body per route, whatever the client sent:
- ``/score/images``: ``{"metric": str, "prompts": [str], "images": [base64 of encoded image files]}``;
- ``/score/latents``: ``{"latents": {"data": base64, "shape": [B, C, H, W], "dtype": str} | {"safetensors":
  base64}, "timesteps": [int], "prompts": [str]}`` or ``{"safetensors": base64}`` (tensors ``latents`` and
  ``timesteps``, prompts as JSON in the file's ``__metadata__["prompts"]``).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import logging
import math
import os
import signal
from collections import defaultdict
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import litserve as ls
import torch
from starlette.responses import JSONResponse

from reward.serve import IMAGES_ROUTE, LATENTS_ROUTE

logger = logging.getLogger(__name__)

OPEN_PATHS = ("/health", "/ready")  # liveness and readiness probes answer without a token
LATENT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SAFETENSORS_TYPES = ("application/x-safetensors", "application/octet-stream")
RECENT_BATCHES = 64
DRAIN_FACTOR = 8  # an oversized body is read and dropped up to this multiple of the limit, so the client sees the 413


class Rejected(Exception):
    """A request the server will not score: its HTTP status and a message naming the problem and the fix."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


# ---------------------------------------------------------------------------------------------------------------
# Gateway: token, size, content types (before anything is queued)


class Gateway:
    """ASGI middleware: bearer token (401), body size (413), content type (415), JSON and multipart syntax (400),
    and the rewrite of multipart, raw-image and safetensors bodies into the route's canonical JSON."""

    def __init__(self, app: Any, *, token: str | None, max_bytes: int) -> None:
        self.app = app
        self.token = token
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope["headers"]}
        if self.token is not None and scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            await _reply(send, 401, "missing or wrong bearer token: send the header 'Authorization: Bearer <token>' "
                         "with the server's --token (or LPO_REWARD_TOKEN)", [(b"www-authenticate", b"Bearer")])
            return
        if scope["method"] != "POST" or scope["path"] not in (IMAGES_ROUTE, LATENTS_ROUTE):
            await self.app(scope, receive, send)
            return
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > DRAIN_FACTOR * self.max_bytes:
            await _reply(send, 413, self._too_large(int(declared)))
            return
        body, size, disconnected = await _read_body(receive, self.max_bytes, DRAIN_FACTOR * self.max_bytes)
        if disconnected:
            return
        if size > self.max_bytes:
            await _reply(send, 413, self._too_large(size))
            return
        try:
            body = canonical_body(scope["path"], headers.get(b"content-type", b"").decode("latin-1"), body,
                                  scope.get("query_string", b"").decode("utf-8", "replace"))
        except Rejected as rejected:
            await _reply(send, rejected.status, rejected.detail)
            return
        kept = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"content-type", b"content-length")]
        scope = dict(scope, headers=[*kept, (b"content-type", b"application/json"),
                                     (b"content-length", str(len(body)).encode())])
        await self.app(scope, _replay(body, receive), send)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, credential = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(credential.strip(), self.token.encode())

    def _too_large(self, size: int) -> str:
        return (f"request body of {size} bytes is over the server's limit of {self.max_bytes} bytes "
                "(--max-request-mb); send fewer or smaller items per request (RewardClient splits by GET /models)")


async def _reply(send: Any, status: int, detail: str, extra: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Any, keep: int, drain: int) -> tuple[bytes, int, bool]:
    """The body (dropped once over `keep` bytes, read up to `drain`), its size, and whether the client left."""
    chunks, size, more = [], 0, True
    while more and size <= drain:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"", size, True
        chunk = message.get("body", b"")
        size += len(chunk)
        more = message.get("more_body", False)
        if size <= keep:
            chunks.append(chunk)
    return b"".join(chunks), size, False


def _replay(body: bytes, receive: Any) -> Any:
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def canonical_body(path: str, content_type: str, body: bytes, query: str) -> bytes:
    """The route's canonical JSON body for what the client sent; raises Rejected for bodies that cannot be read."""
    media = content_type.partition(";")[0].strip().lower()
    if media in ("", "application/json"):
        _check_json(body)
        return body
    if path == IMAGES_ROUTE:
        if media == "multipart/form-data":
            return json.dumps(_multipart_images(content_type, body)).encode()
        if media.startswith("image/") or media == "application/octet-stream":
            fields = parse_qs(query)
            return json.dumps({"metric": fields.get("metric", [None])[0], "prompts": fields.get("prompt", []),
                               "images": [_b64(body)]}).encode()
        accepted = "application/json, multipart/form-data, or an image/* body with ?metric=...&prompt=..."
    else:
        if media in SAFETENSORS_TYPES:
            return json.dumps({"safetensors": _b64(body)}).encode()
        accepted = f"application/json or {' or '.join(SAFETENSORS_TYPES)} (a safetensors file)"
    hint = " (curl -d sends form data: add -H 'Content-Type: application/json')" if "urlencoded" in media else ""
    raise Rejected(415, f"Content-Type {media!r} is not accepted on {path}; send {accepted}{hint}")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _check_json(body: bytes) -> None:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise Rejected(400, f"malformed JSON body ({err}); send one JSON object (README, 'Reward service')") from None
    if not isinstance(value, dict):
        raise Rejected(422, f"the JSON body is a {type(value).__name__}; send one JSON object with the route's fields")


def _multipart_images(content_type: str, body: bytes) -> dict[str, Any]:
    import email
    import email.policy

    message = email.message_from_bytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body,
                                       policy=email.policy.HTTP)
    if not message.is_multipart() or message.defects:
        problem = type(message.defects[0]).__name__ if message.defects else "no parts found"
        raise Rejected(400, f"malformed multipart body ({problem}); send form fields metric, prompts (one per image, "
                            "in order) and image files named images")
    fields: dict[str, Any] = {"metric": None, "prompts": [], "images": []}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        data = part.get_payload(decode=True) or b""
        if part.get_filename() is not None or name in ("images", "image"):
            fields["images"].append(_b64(data))
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise Rejected(422, f"multipart field {name!r} is not UTF-8 text") from None
        if name == "metric":
            fields["metric"] = text
        elif name in ("prompts", "prompt"):
            fields["prompts"].append(text)
        else:
            raise Rejected(422, f"unknown multipart field {name!r}; send metric, prompts (one per image, in order) "
                                "and image files named images")
    return fields


# ---------------------------------------------------------------------------------------------------------------
# Request decoders (in the worker, one request at a time; they raise Rejected, the LitAPIs return it)


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
    from PIL import Image

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
    from safetensors.torch import load

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
    dtype = LATENT_DTYPES.get(spec["dtype"]) if isinstance(spec["dtype"], str) else None
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


def _timesteps(value: Any, n: int, num_timesteps: int) -> torch.Tensor:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value] * n
    if torch.is_tensor(value):
        if value.dtype.is_floating_point or value.dtype == torch.bool or value.dim() > 1:
            raise Rejected(422, f"timesteps tensor is {value.dtype} of shape {list(value.shape)}; send [B] integers")
        steps = value.to(torch.long).expand(n) if value.dim() == 0 else value.to(torch.long)
    elif isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        steps = torch.tensor(value, dtype=torch.long)
    else:
        raise Rejected(422, "timesteps must be an integer or a list of integers, one per latent")
    if steps.numel() != n:
        raise Rejected(422, f"{n} latents but {steps.numel()} timesteps; send one timestep per latent")
    if steps.numel() and not (0 <= int(steps.min()) and int(steps.max()) < num_timesteps):
        raise Rejected(422, f"timesteps {steps.tolist()} go outside [0, {num_timesteps - 1}]")
    return steps


def decode_latents(request: Any, latent_shape: tuple[int, int, int], num_timesteps: int,
                   max_items: int) -> LatentRequest:
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
    if latents.dtype not in LATENT_DTYPES.values():
        raise Rejected(422, f"latents dtype {str(latents.dtype).removeprefix('torch.')} is not accepted; send "
                            f"{', '.join(LATENT_DTYPES)}")
    if latents.dim() != 4 or tuple(latents.shape[1:]) != tuple(latent_shape):
        expected = ", ".join(map(str, latent_shape))
        raise Rejected(422, f"latents have shape {list(latents.shape)}; this model takes [B, {expected}] "
                            "(GET /models)")
    _count(latents.shape[0], max_items, "latents")
    if timesteps is None:
        raise Rejected(422, "timesteps are missing; send one integer timestep per latent")
    steps = _timesteps(timesteps, latents.shape[0], num_timesteps)
    prompts = _prompts(prompts, latents.shape[0], "latent")
    if not bool(torch.isfinite(latents).all()):
        raise Rejected(422, "latents hold NaN or infinite values")
    return LatentRequest(latents, steps, prompts)


# ---------------------------------------------------------------------------------------------------------------
# LitAPIs


def _number(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None  # JSON has no NaN or infinity: null


def _configure_worker_logging(level: int) -> None:
    """Workers are fresh interpreters (spawned): give them the CLI's log format and level."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for ours in ("curate", "reward"):
        logging.getLogger(ours).setLevel(level or logging.INFO)


class _ScoringAPI(ls.LitAPI):
    """What both routes share: per-request validation, batch scoring with a per-request fallback, statistics."""

    route: str

    def __init__(self, *, registry: Any, stats: Any, max_batch_size: int, batch_timeout: float, dtype: str,
                 max_items: int, log_level: int, cpu_threads: int | None = None) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=self.route)
        self.registry = registry
        self.stats = stats
        self.dtype_name = dtype
        self.max_items = max_items
        self.log_level = log_level
        self.cpu_threads = cpu_threads

    def setup(self, device: str) -> None:
        from curate.score import _resolve_dtype

        _configure_worker_logging(self.log_level)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the whole process group; the server stops us
        if device == "cpu" and self.cpu_threads:
            torch.set_num_threads(self.cpu_threads)  # CPU workers share the cores instead of each taking them all
        self.on = device
        self.torch_dtype = _resolve_dtype(self.dtype_name, device)
        self.stats_key = f"{self.route}#{os.getpid()}"
        self.counts: dict[str, Any] = {"route": self.route, "batches": 0, "requests": 0, "rejected": 0,
                                       "batch_sizes": {}, "recent": []}
        for name, info in self.load(device).items():
            self.registry[f"{name}#{os.getpid()}"] = {"name": name, "route": self.route, "device": device,
                                                     "dtype": str(self.torch_dtype).removeprefix("torch."), **info}

    def load(self, device: str) -> dict[str, dict[str, Any]]:
        """Load the models on `device`; return what GET /models shows for each."""
        raise NotImplementedError

    def decode(self, request: Any) -> Any:
        raise NotImplementedError

    def score(self, requests: list[Any]) -> list[dict[str, Any]]:
        """One response per request, the requests scored together."""
        raise NotImplementedError

    def decode_request(self, request):  # unannotated: LitServe reads the annotation as the request body type
        try:
            return self.decode(request)
        except Rejected as rejected:
            return rejected

    def predict(self, x: Any) -> Any:
        # Batched (max_batch_size > 1): a list of decoded requests; otherwise LitServe passes one.
        batch = x if isinstance(x, list) else [x]
        good = [i for i, item in enumerate(batch) if not isinstance(item, Rejected)]
        outputs = list(batch)
        if good:
            with torch.inference_mode():
                for i, output in zip(good, self._score_isolating_failures([batch[i] for i in good])):
                    outputs[i] = output
        self._record(len(batch), len(batch) - len(good))
        return outputs if isinstance(x, list) else outputs[0]

    def _score_isolating_failures(self, requests: list[Any]) -> list[Any]:
        try:
            return self.score(requests)
        except Exception as err:
            if len(requests) == 1:
                logger.exception("%s: scoring a request failed", self.route)
                return [Rejected(500, f"the model failed on this request ({type(err).__name__}: {err})")]
            logger.warning("%s: a batch of %d requests failed (%s); scoring them one by one", self.route,
                           len(requests), err)
            return [self._score_isolating_failures([request])[0] for request in requests]

    def encode_response(self, output: Any) -> Any:
        if isinstance(output, Rejected):
            return JSONResponse({"detail": output.detail}, status_code=output.status)
        return output

    def _record(self, size: int, rejected: int) -> None:
        counts = self.counts
        counts["batches"] += 1
        counts["requests"] += size
        counts["rejected"] += rejected
        counts["batch_sizes"][str(size)] = counts["batch_sizes"].get(str(size), 0) + 1
        counts["recent"] = [*counts["recent"], [size, rejected]][-RECENT_BATCHES:]
        try:
            self.stats[self.stats_key] = counts
        except Exception:  # the manager is gone while shutting down; statistics are best effort
            logger.debug("could not publish batch statistics", exc_info=True)

    def _chunks(self, n: int) -> list[slice]:
        return [slice(start, start + self.max_items) for start in range(0, n, self.max_items)]


class ImageScoreAPI(_ScoringAPI):
    """POST /score/images: every loaded curation scorer; requests of a batch are grouped by metric."""

    route = IMAGES_ROUTE

    def __init__(self, *, specs: dict[str, str | None], **shared: Any) -> None:
        super().__init__(**shared)
        self.specs = dict(specs)
        self.metrics = tuple(specs)

    def load(self, device: str) -> dict[str, dict[str, Any]]:
        from curate.scorers import load_scorer

        self.scorers = {metric: load_scorer(metric, spec, device=device, dtype=self.torch_dtype)
                        for metric, spec in self.specs.items()}
        return {m: {"model_id": s.model_id, "scale": s.scale} for m, s in self.scorers.items()}

    def decode(self, request: Any) -> ImageRequest:
        return decode_images(request, self.metrics, self.max_items)

    def score(self, requests: list[ImageRequest]) -> list[dict[str, Any]]:
        import numpy as np

        by_metric: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            by_metric[request.metric].append(i)
        outputs: list[dict[str, Any]] = [{} for _ in requests]
        for metric, members in by_metric.items():
            scorer = self.scorers[metric]
            images = [image for i in members for image in requests[i].images]
            prompts = [prompt for i in members for prompt in requests[i].prompts]
            scores = np.concatenate([scorer.score(images[part], prompts[part]) for part in self._chunks(len(images))])
            start = 0
            for i in members:
                end = start + len(requests[i].images)
                outputs[i] = {"metric": metric, "model_id": scorer.model_id,
                              "scores": [_number(v) for v in scores[start:end]]}
                start = end
        return outputs


class LatentScoreAPI(_ScoringAPI):
    """POST /score/latents: the latent reward model on noisy latents; a batch's latents run through it together."""

    route = LATENTS_ROUTE

    def __init__(self, *, lrm: str, latent_shape: tuple[int, int, int], num_timesteps: int, **shared: Any) -> None:
        super().__init__(**shared)
        self.lrm = lrm
        self.latent_shape = tuple(latent_shape)
        self.num_timesteps = num_timesteps

    def load(self, device: str) -> dict[str, dict[str, Any]]:
        from reward.lrm import LatentRewardModel

        self.model = LatentRewardModel.from_pretrained(self.lrm, dtype=self.torch_dtype).to(device)
        bound = float(self.model.logit_scale.detach().exp())
        return {"lrm": {"model_id": self.lrm, "family": self.model.config.family,
                        "scale": f"exp(logit_scale) * cosine(visual, text), in [-{bound:.4g}, {bound:.4g}]",
                        "latent_shape": list(self.latent_shape), "timesteps": [0, self.num_timesteps - 1],
                        "latent_dtypes": list(LATENT_DTYPES)}}

    def decode(self, request: Any) -> LatentRequest:
        return decode_latents(request, self.latent_shape, self.num_timesteps, self.max_items)

    def score(self, requests: list[LatentRequest]) -> list[dict[str, Any]]:
        # float32 holds float16 and bfloat16 exactly, so the model's own cast gives what it gives in process.
        latents = torch.cat([r.latents.float() for r in requests])
        timesteps = torch.cat([r.timesteps for r in requests])
        prompts = [prompt for r in requests for prompt in r.prompts]
        scores = torch.cat([
            self.model.score(latents[part].to(self.on), timesteps[part].to(self.on), prompts[part]).cpu()
            for part in self._chunks(len(prompts))
        ])
        dtype = str(scores.dtype).removeprefix("torch.")
        outputs, start = [], 0
        for request in requests:
            end = start + len(request.prompts)
            outputs.append({"model_id": self.lrm, "dtype": dtype,
                            "scores": [_number(v) for v in scores[start:end].tolist()]})
            start = end
        return outputs


# ---------------------------------------------------------------------------------------------------------------
# Routes the workers do not answer: liveness, the loaded models, batch statistics


def merge_models(registry: dict[str, dict[str, Any]], expected: dict[str, str]) -> dict[str, Any]:
    """One entry per model (the devices that hold it merged) and whether every expected model has loaded."""
    merged: dict[str, dict[str, Any]] = {}
    for info in registry.values():
        entry = merged.setdefault(info["name"], {**{k: v for k, v in info.items() if k != "device"}, "devices": []})
        entry["devices"] = sorted({*entry["devices"], info["device"]})
    models = sorted(merged.values(), key=lambda m: (m["route"], m["name"]))
    return {"loaded": all(name in merged for name in expected), "models": models}


def merge_stats(stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Batches, requests, rejected requests and the batch-size histogram per route, over every worker."""
    merged: dict[str, dict[str, Any]] = {}
    for counts in stats.values():
        route = merged.setdefault(counts["route"], {"batches": 0, "requests": 0, "rejected": 0, "batch_sizes": {},
                                                    "recent": []})
        for key in ("batches", "requests", "rejected"):
            route[key] += counts[key]
        for size, n in counts["batch_sizes"].items():
            route["batch_sizes"][size] = route["batch_sizes"].get(size, 0) + n
        route["recent"] += counts["recent"]
    return merged


def add_routes(app: Any, registry: Any, stats: Any, limits: dict[str, Any], expected: dict[str, str]) -> None:
    """GET /health, /models and /stats on the FastAPI app LitServe built (GET /ready is LitServe's health check)."""

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/models")
    def models() -> dict[str, Any]:
        return {**merge_models(dict(registry), expected), "limits": limits}

    @app.get("/stats")
    def batch_stats() -> dict[str, Any]:
        return merge_stats(dict(stats))
