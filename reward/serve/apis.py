"""The LitServe side of `lpo reward serve`: one LitAPI per route, and the routes the workers do not answer.

Bad input and batching. LitServe's batched loop decodes every request of a batch, calls `predict` once on the
list, then encodes each output; an exception raised anywhere in that sequence fails *every* request of the batch
with the same error. So nothing here raises for a bad request: `decode_request` validates its own request
(`lpo.reward.serve.requests`) and returns a `Rejected` (status and message) instead of the decoded input,
`predict` scores the good requests of the batch together and passes the rejected ones through, and
`encode_response` turns a `Rejected` into a JSON error response with its status. A model failure on a batch is
retried request by request, so a request that passes validation but breaks the model fails alone. What can be
checked without a model is answered by the gateway (`lpo.reward.serve.gateway`) before a request is queued.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import signal
from collections import defaultdict
from typing import Any

import litserve as ls
import numpy as np
import torch
from starlette.responses import JSONResponse

from lpo.core.device import resolve_dtype
from lpo.curate.scorers import load_scorer
from lpo.reward.backbones import get_family
from lpo.reward.lrm.model import LatentRewardModel, component
from lpo.reward.serve.protocol import (
    DRM_ROUTE,
    DRM_VERSION,
    IMAGES_ROUTE,
    LATENT_DTYPES,
    LATENTS_ROUTE,
    Rejected,
    timestep_range,
)
from lpo.reward.serve.requests import (
    DRMRequest,
    ImageRequest,
    LatentRequest,
    decode_drm,
    decode_images,
    decode_latents,
)

logger = logging.getLogger(__name__)

RECENT_BATCHES = 64


def _number(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None  # JSON has no NaN or infinity: null


def _configure_worker_logging(level: int) -> None:
    """Workers are fresh interpreters (spawned): give them the CLI's log format and level."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lpo").setLevel(level or logging.INFO)


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
        _configure_worker_logging(self.log_level)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the whole process group; the server stops us
        if device == "cpu" and self.cpu_threads:
            torch.set_num_threads(self.cpu_threads)  # CPU workers share the cores instead of each taking them all
        self.on = device
        self.torch_dtype = resolve_dtype(self.dtype_name, device)
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
        self.scorers = {metric: load_scorer(metric, spec, device=device, dtype=self.torch_dtype)
                        for metric, spec in self.specs.items()}
        return {m: {"model_id": s.model_id, "scale": s.scale} for m, s in self.scorers.items()}

    def decode(self, request: Any) -> ImageRequest:
        return decode_images(request, self.metrics, self.max_items)

    def score(self, requests: list[ImageRequest]) -> list[dict[str, Any]]:
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

    def __init__(self, *, lrm: str, latent_shape: tuple[int, int, int], num_timesteps: int,
                 continuous: bool = False, **shared: Any) -> None:
        super().__init__(**shared)
        self.lrm = lrm
        self.latent_shape = tuple(latent_shape)
        self.num_timesteps = num_timesteps
        self.continuous = continuous  # flow matching: timesteps are sigma x num_timesteps, any number in range

    def load(self, device: str) -> dict[str, dict[str, Any]]:
        self.model = LatentRewardModel.from_pretrained(self.lrm, dtype=self.torch_dtype).to(device)
        bound = float(self.model.logit_scale.detach().exp())
        return {"lrm": {"model_id": self.lrm, "family": self.model.config.family,
                        "scale": f"exp(logit_scale) * cosine(visual, text), in [-{bound:.4g}, {bound:.4g}]",
                        "latent_shape": list(self.latent_shape),
                        "timesteps": timestep_range(self.num_timesteps, self.continuous),
                        "latent_dtypes": list(LATENT_DTYPES)}}

    def decode(self, request: Any) -> LatentRequest:
        return decode_latents(request, self.latent_shape, self.num_timesteps, self.max_items, self.continuous)

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


class DRMScoreAPI(_ScoringAPI):
    """POST /drm/v1/score: VeRL-Omni's latent-reward protocol v1, for flow-matching LRMs (sd3, flux).

    A request holds one clean latent, its prompt as the base pipeline encoded it (`prompt_embeds`,
    `pooled_prompt_embeds`), the noise level `u` and optionally a seed. The latent is noised by the flow forward
    process to sigma = u, x = (1 - u) x0 + u eps, with eps = torch.randn(latent shape, float32, on the CPU, from
    torch.Generator().manual_seed(seed)) (the server draws the seed when none is sent, and returns it), and scored
    at timestep u x num_train_timesteps from the given embeddings: no prompt is encoded per request. Feature
    guidance's empty-prompt branch is the LRM's own encoding of "", computed once at start-up, after which the text
    encoders are released; the request's token sequence must then have that encoding's length."""

    route = DRM_ROUTE

    def __init__(self, *, lrm: str, latent_shape: tuple[int, int, int], num_timesteps: int, **shared: Any) -> None:
        super().__init__(**shared)
        self.lrm = lrm
        self.latent_shape = tuple(latent_shape)
        self.num_timesteps = num_timesteps

    def load(self, device: str) -> dict[str, dict[str, Any]]:
        model = LatentRewardModel.from_pretrained(self.lrm, dtype=self.torch_dtype).to(device)
        self.model = model
        self.noise = get_family(model.config.family).noise_schedule(*component(*model.source, "scheduler"))
        config = model.backbone.transformer.config
        length = None
        if model.config.vfe_scale != 1.0:
            with torch.inference_mode():
                length = int(model.empty_text()["context"].shape[1])
            model.release_text_encoders()
        self.context_shape = (length, int(config.joint_attention_dim))
        self.pooled_width = int(config.pooled_projection_dim)
        return {"drm": {"model_id": self.lrm, "family": model.config.family, "protocol_version": DRM_VERSION,
                        "latent_shape": list(self.latent_shape), "prompt_embeds": list(self.context_shape),
                        "pooled_prompt_embeds": [self.pooled_width], "u": [0.0, 1.0]}}

    def decode(self, request: Any) -> DRMRequest:
        return decode_drm(request, self.latent_shape, self.context_shape, self.pooled_width)

    def score(self, requests: list[DRMRequest]) -> list[Any]:
        seeds = [r.seed if r.seed is not None else secrets.randbits(63) for r in requests]
        scores: list[float] = [0.0] * len(requests)
        by_length: dict[int, list[int]] = defaultdict(list)  # one model call per prompt sequence length
        for i, request in enumerate(requests):
            by_length[request.context.shape[1]].append(i)
        for members in by_length.values():
            latents = torch.cat([requests[i].latents for i in members])
            noise = torch.cat([torch.randn(requests[i].latents.shape,
                                           generator=torch.Generator().manual_seed(seeds[i])) for i in members])
            timesteps = torch.tensor([requests[i].u * self.num_timesteps for i in members], dtype=torch.float32)
            noisy = self.noise.add_noise(latents, noise, timesteps)
            text = self.model.text_from_embeddings(torch.cat([requests[i].context for i in members]).to(self.on),
                                                   torch.cat([requests[i].pooled for i in members]).to(self.on))
            values = self.model.score(noisy.to(self.on), timesteps.to(self.on), [""] * len(members), text=text)
            for i, value in zip(members, values.float().cpu().tolist()):
                scores[i] = value
        return [{"protocol_version": DRM_VERSION, "raw_scores": [value], "seeds": [seed]} if math.isfinite(value)
                else Rejected(500, f"the reward model gave a non-finite score ({value}) for this latent")
                for value, seed in zip(scores, seeds)]


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
