"""A client for `lpo reward serve` with the signatures of the in-process scorers and latent reward model.

    from lpo.reward.serve.client import RewardClient

    rewards = RewardClient("http://10.0.0.5:8000")                 # token: argument or LPO_REWARD_TOKEN
    rewards.score_images("pickscore", images, prompts)              # as load_scorer(...).score(images, prompts)
    rewards.score_latents(latents, timesteps, prompts)              # as LatentRewardModel.score(latents, t, prompts)

Importing it needs only the standard library (numpy, PIL, torch and safetensors load when a method needs them), so a
trainer can swap it in for the local models. Large inputs are split into requests within the server's limits
(GET /models) and sent concurrently, so the server's dynamic batching sees them together. Connection errors and
502/503/504 answers are retried with exponential backoff; a 4xx raises `RewardServiceError` with the server's
message at once. Connections go straight to the server (no HTTP proxy from the environment).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import save

from lpo.core.errors import InputError
from lpo.reward.serve.protocol import IMAGES_ROUTE, LATENTS_ROUTE, TOKEN_ENV

if TYPE_CHECKING:
    import numpy
    import PIL.Image
    import torch

logger = logging.getLogger(__name__)

RETRY_STATUSES = (502, 503, 504)
MAX_BACKOFF_S = 10.0
STATUS_TIMEOUT_S = 10.0
BODY_HEADROOM = 0.9  # share of the server's byte limit a request fills, leaving room for JSON and headers


class RewardServiceError(RuntimeError):
    """The reward service refused a request (`status`, the server's `detail`) or could not be reached (status None)."""

    def __init__(self, message: str, status: int | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


class RewardClient:
    """Calls a reward service; `score_images` and `score_latents` return what the in-process models return."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 300.0, retries: int = 5,
                 backoff: float = 0.5, parallel_requests: int = 4, max_items_per_request: int | None = None,
                 max_request_bytes: int | None = None) -> None:
        self.url = url.rstrip("/")
        self.token = token if token is not None else os.environ.get(TOKEN_ENV)
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.parallel_requests = max(1, parallel_requests)
        self._limits = {"max_items_per_request": max_items_per_request, "max_request_bytes": max_request_bytes}
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # -----------------------------------------------------------------------------------------------------------
    # scoring, with the in-process signatures

    def score_images(self, metric: str, images: Sequence[PIL.Image.Image | bytes],
                     prompts: Sequence[str]) -> numpy.ndarray:
        """Score image i against prompts[i] with `metric`: float64 scores, as `Scorer.score(images, prompts)`.

        Images are PIL images (sent losslessly as PNG) or encoded image file bytes (sent as they are)."""

        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts: pass one prompt per image")
        if not images:
            return np.zeros(0, dtype=np.float64)
        encoded = [base64.b64encode(_encode_image(image)).decode("ascii") for image in images]
        parts = self._split([len(e) + len(p.encode()) + 8 for e, p in zip(encoded, prompts)])
        bodies = [json.dumps({"metric": metric, "images": encoded[part], "prompts": list(prompts[part])}).encode()
                  for part in parts]
        answers = self._post_all(IMAGES_ROUTE, bodies, "application/json")
        return np.array([np.nan if s is None else s for a in answers for s in a["scores"]], dtype=np.float64)

    def score_latents(self, latents: torch.Tensor, timesteps: torch.Tensor | Sequence[int] | int,
                      prompts: Sequence[str]) -> torch.Tensor:
        """Score noisy latents [B, C, H, W] at `timesteps` ([B] or one number: integers for DDPM families, sigma x
        1000 for flow matching) against prompts: a [B] CPU tensor in the
        served model's dtype, as `LatentRewardModel.score(latents, timesteps, prompts)`. float64 latents are sent as
        float32 (what a float32 model computes in anyway)."""

        latents = latents.detach().to("cpu")
        if latents.dtype == torch.float64:
            latents = latents.float()
        if latents.dim() != 4 or len(prompts) != latents.shape[0]:
            raise ValueError(f"latents of shape {list(latents.shape)} and {len(prompts)} prompts: pass [B, C, H, W] "
                             "latents and one prompt per latent")
        if not len(prompts):
            return torch.zeros(0)
        steps = torch.as_tensor(timesteps).to("cpu")
        steps = steps.to(torch.float32 if steps.dtype.is_floating_point else torch.long)  # flow: sigma x 1000
        steps = steps.expand(latents.shape[0]).contiguous()
        per_item = latents[0].numel() * latents.element_size() + 8
        parts = self._split([per_item + len(p.encode()) + 8 for p in prompts])
        bodies = [save({"latents": latents[part].contiguous(), "timesteps": steps[part].contiguous()},
                       metadata={"prompts": json.dumps(list(prompts[part]))}) for part in parts]
        answers = self._post_all(LATENTS_ROUTE, bodies, "application/x-safetensors")
        scores = [float("nan") if s is None else s for a in answers for s in a["scores"]]
        return torch.tensor(scores, dtype=getattr(torch, answers[0]["dtype"]))

    # -----------------------------------------------------------------------------------------------------------
    # service state

    def health(self) -> bool:
        """Whether the server process answers (GET /health)."""
        return self._get_status("/health") == 200

    def ready(self) -> bool:
        """Whether every worker has loaded its models (GET /ready)."""
        return self._get_status("/ready") == 200

    def wait_until_ready(self, timeout: float = 600.0, poll: float = 0.5) -> None:
        """Block until GET /ready answers 200; raise RewardServiceError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise RewardServiceError(f"{self.url} was not ready within {timeout:.0f} s; check the server's log")
            time.sleep(poll)

    def models(self) -> dict[str, Any]:
        """The loaded models (name, route, model_id, scale, devices) and the request limits (GET /models)."""
        return self._request("GET", "/models")

    def stats(self) -> dict[str, Any]:
        """Batches run per route, their sizes and the rejected requests (GET /stats)."""
        return self._request("GET", "/stats")

    # -----------------------------------------------------------------------------------------------------------
    # transport

    def _limit(self, key: str) -> int:
        if self._limits[key] is None:
            self._limits.update({k: v for k, v in self.models()["limits"].items() if self._limits.get(k) is None})
        return int(self._limits[key])

    def _split(self, sizes: list[int]) -> list[slice]:
        """Consecutive runs of items within the server's item and byte limits (an oversized item goes alone)."""
        max_items = self._limit("max_items_per_request")
        budget = int(self._limit("max_request_bytes") * BODY_HEADROOM)
        parts, start, used = [], 0, 0
        for i, size in enumerate(sizes):
            if i > start and (i - start >= max_items or used + size > budget):
                parts.append(slice(start, i))
                start, used = i, 0
            used += size
        parts.append(slice(start, len(sizes)))
        return parts

    def _post_all(self, path: str, bodies: list[bytes], content_type: str) -> list[dict[str, Any]]:
        if len(bodies) == 1:
            return [self._request("POST", path, bodies[0], content_type)]
        with ThreadPoolExecutor(min(self.parallel_requests, len(bodies))) as pool:
            return list(pool.map(lambda body: self._request("POST", path, body, content_type), bodies))

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def _get_status(self, path: str) -> int | None:
        request = urllib.request.Request(self.url + path, headers=self._headers(None))
        try:
            with self._opener.open(request, timeout=min(self.timeout, STATUS_TIMEOUT_S)) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code
        except (urllib.error.URLError, ConnectionError, http.client.HTTPException):
            return None

    def _request(self, method: str, path: str, body: bytes | None = None,
                 content_type: str | None = None) -> dict[str, Any]:
        """One call with retries on connection errors and 502/503/504; the decoded JSON answer."""
        attempt = 0
        while True:
            request = urllib.request.Request(self.url + path, data=body, method=method,
                                             headers=self._headers(content_type))
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as err:
                detail = _detail(err.read())
                if err.code not in RETRY_STATUSES or attempt == self.retries:
                    raise RewardServiceError(f"{method} {self.url}{path} -> {err.code}: {detail}", err.code,
                                             detail) from None
                problem = f"HTTP {err.code}: {detail}"
            except (urllib.error.URLError, ConnectionError, http.client.HTTPException) as err:
                problem = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
                if attempt == self.retries:
                    raise RewardServiceError(f"could not reach {self.url}{path} after {attempt + 1} attempts "
                                             f"({problem}); is `lpo reward serve` running there?") from err
            wait = min(self.backoff * 2**attempt, MAX_BACKOFF_S)
            logger.warning("%s %s%s failed (%s); retrying in %.1f s", method, self.url, path, problem, wait)
            time.sleep(wait)
            attempt += 1


def _detail(body: bytes) -> str:
    try:
        detail = json.loads(body).get("detail", body.decode())
    except (ValueError, AttributeError):
        return body.decode("utf-8", "replace")[:500]
    return detail if isinstance(detail, str) else json.dumps(detail)


def _encode_image(image: Any) -> bytes:
    """Encoded file bytes as given, or a PIL image as lossless PNG (modes PNG cannot hold go as RGB, which is what
    the scorers convert every image to)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    buffer = io.BytesIO()
    try:
        image.save(buffer, format="PNG", compress_level=1)
    except (OSError, ValueError, KeyError):
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Drop-in stand-ins for the in-process models, used by `--reward-url`


class RemoteScorer:
    """A served metric with the interface of a `lpo.curate.scorers.base.Scorer` (`score`, `name`, `model_id`,
    `scale`)."""

    def __init__(self, client: RewardClient, metric: str, info: dict[str, Any]) -> None:
        self.client = client
        self.name = metric
        self.model_id = f"{info.get('model_id')} (served at {client.url})"
        self.scale = info.get("scale", "")

    def score(self, images: Sequence[Any], captions: Sequence[str]) -> Any:
        return self.client.score_images(self.name, list(images), list(captions))


class RemoteLatentRewardModel:
    """The served LRM with the part of `LatentRewardModel`'s interface that sampling and LPO use."""

    def __init__(self, client: RewardClient, info: dict[str, Any]) -> None:
        self.client = client
        self.family = info["family"]
        self.model_id = f"{info.get('model_id')} (served at {client.url})"
        self.device = torch.device("cpu")  # latents travel as CPU tensors
        self.dtype = torch.float32

    def encode_text(self, prompts: Sequence[str]) -> None:
        return None  # the server encodes prompts itself

    def score(self, latents: Any, timesteps: Any, prompts: Sequence[str], text: Any = None) -> Any:
        return self.client.score_latents(latents, timesteps, list(prompts)).float()


def connect(url: str, need_lrm: bool = False, metrics: Sequence[str] = ()) -> tuple[RewardClient, dict[str, Any]]:
    """A client for `url` and the served models by name (`lrm` for the latent reward model), after checking that
    the service answers and serves what the caller needs; raises `RewardServiceError` with the fix otherwise."""
    client = RewardClient(url, retries=2)
    try:
        listing = client.models()
    except RewardServiceError as err:
        raise RewardServiceError(f"could not reach the reward service at {url} ({err}); start it with "
                                 "`lpo reward serve` or fix --reward-url.") from None
    models = {entry["name"]: entry for entry in listing.get("models", [])}
    if need_lrm and "lrm" not in models:
        raise RewardServiceError(f"the reward service at {url} serves no latent reward model; start it with --lrm.")
    missing = [m for m in metrics if m not in models]
    if missing:
        raise RewardServiceError(f"the reward service at {url} does not serve {missing}; it serves "
                                 f"{sorted(models)}.")
    return client, models


def remote_lrm(url: str, family: str, base: str) -> RemoteLatentRewardModel:
    """The LRM served at `url`, after checking that it scores latents of `family`'s latent space; InputError (exit
    code 2) when the service cannot be reached or serves another one."""
    try:
        client, models = connect(url, need_lrm=True)
    except RewardServiceError as err:
        raise InputError(str(err)) from None
    remote = RemoteLatentRewardModel(client, models["lrm"])
    if remote.family != family:
        raise InputError(f"the latent reward model served at {url} was built on an {remote.family} backbone, but "
                         f"{base} is a pipeline of the {family} family: their latent spaces differ.")
    return remote


def remote_scorers(url: str | None, metrics: Sequence[str]) -> dict[str, RemoteScorer]:
    """The metrics a running reward service serves, as scorers; the others stay local (none without a url)."""
    if url is None:
        return {}
    try:
        client, models = connect(url)
    except RewardServiceError as err:
        raise InputError(str(err)) from None
    served = {m: RemoteScorer(client, m, models[m]) for m in metrics if m in models}
    logger.info("scoring %s at %s; %s locally", sorted(served) or "nothing", url,
                sorted(set(metrics) - set(served)) or "nothing")
    return served
