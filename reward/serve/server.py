"""`lpo reward serve`: the latent reward model and the curation scorers behind an HTTP API.

Trainers on many GPUs and nodes call rewards over the network instead of each loading every model. The server is
LitServe: one inference worker per device (and per route) loads the models once, and requests that arrive within
`batch_timeout_ms` of each other are scored in one model call (dynamic batching, up to `max_batch_size` requests).

Routes (request and response JSON in docs/serving.md):
- ``POST /score/images``: images (base64 in JSON, multipart files, or one raw encoded image) scored against prompts
  on one loaded metric; the scores of `lpo.curate.scorers.load_scorer(metric).score(images, prompts)`.
- ``POST /score/latents``: noisy latents (a safetensors body, or base64 raw data with shape and dtype in JSON) with
  timesteps and prompts; the scores of `LatentRewardModel.score(latents, timesteps, prompts)`.
- ``POST /drm/v1/score``: VeRL-Omni's latent-reward protocol v1 (flow-matching LRMs): one clean latent with its
  pipeline prompt embeddings, noised to sigma = u and scored (`apis.DRMScoreAPI`).
- ``GET /health`` (the process answers), ``GET /ready`` (every worker has loaded its models), ``GET /models`` (ids,
  scales and request limits), ``GET /stats`` (batches run per route and their sizes).

`lpo.reward.serve.client.RewardClient` calls these routes with the same signatures as the in-process scorers and
LRM. The gateway, the request decoders and the LitServe classes live beside
it (`gateway`, `requests`, `apis`); the options in `config`.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import litserve as ls

from lpo.core.device import cuda_available
from lpo.core.errors import InputError, RunFailed
from lpo.curate.score import ScoreConfig, validate_models
from lpo.reward.backbones import get_family
from lpo.reward.lrm.model import read_lrm_config, resolve_lrm
from lpo.reward.serve import apis, gateway
from lpo.reward.serve.config import ServeConfig
from lpo.reward.serve.protocol import (
    DEFAULT_NUM_TIMESTEPS,
    DRM_ROUTE,
    IMAGES_ROUTE,
    LATENTS_ROUTE,
    TOKEN_ENV,
    timestep_range,
)

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS = {"127.0.0.1": "127.0.0.1", "localhost": "127.0.0.1"}
OPEN_HOSTS = ("0.0.0.0", "::")  # the other addresses LitServe can bind
DTYPES = ("auto", "float32", "float16", "bfloat16")


class ServeFailed(RunFailed):
    """The server could not start although its inputs were valid (a worker failed to load its models)."""


@dataclass
class ServePlan:
    """What `validate` resolved: the model spec per metric, the bind address, the token, the device kind."""

    specs: dict[str, str | None]
    host: str
    token: str | None
    accelerator: str
    latent_shape: tuple[int, ...] | None
    num_timesteps: int
    continuous: bool = False  # flow matching: timesteps are sigma x num_timesteps, not integers
    family: str | None = None  # the LRM's family


def resolve_token(config: ServeConfig) -> str | None:
    """The bearer token: `config.token`, else the LPO_REWARD_TOKEN environment variable, else None."""
    token = config.token if config.token is not None else os.environ.get(TOKEN_ENV)
    if token is not None and not token.strip():
        raise InputError(f"the bearer token is empty; pass --token or set {TOKEN_ENV} to a non-empty secret, or "
                         "unset both to serve on loopback without one.")
    return token


def _check_bind(config: ServeConfig) -> tuple[str, str | None]:
    host = LOOPBACK_HOSTS.get(config.host, config.host)
    if host not in ("127.0.0.1", *OPEN_HOSTS):
        raise InputError(f"--host {config.host} is not one LitServe can bind; use 127.0.0.1 (loopback, the default), "
                         "0.0.0.0 (every IPv4 interface) or :: (every interface).")
    if not 1024 <= config.port <= 65535:
        raise InputError(f"--port {config.port} is outside 1024-65535; pick a free port in that range.")
    token = resolve_token(config)
    if host in OPEN_HOSTS and token is None:
        raise InputError(f"--host {config.host} serves every network interface, so requests must carry a bearer "
                         f"token: pass --token SECRET or set {TOKEN_ENV}=SECRET (clients send 'Authorization: "
                         "Bearer SECRET'), or bind loopback with --host 127.0.0.1.")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, config.port))
        except OSError as err:
            raise InputError(f"cannot bind {host}:{config.port} ({err.strerror}); another process may hold the port: "
                             "pick another --port.") from None
    return host, token


def _check_options(config: ServeConfig) -> None:
    if config.max_batch_size < 1 or config.workers_per_device < 1 or config.max_items_per_request < 1:
        raise InputError(f"--max-batch-size {config.max_batch_size}, --workers-per-device {config.workers_per_device} "
                         f"and --max-items-per-request {config.max_items_per_request} must each be at least 1.")
    if not config.batch_timeout_ms > 0:
        raise InputError(f"--batch-timeout-ms {config.batch_timeout_ms} must be above 0 (LitServe's batching loop "
                         "spins on an empty queue at 0); 1-50 ms suits most trainers.")
    if not config.max_request_mb > 0 or not config.request_timeout_s > 0:
        raise InputError("--max-request-mb and --request-timeout-s must be above 0.")
    if config.batch_timeout_ms / 1000 >= config.request_timeout_s:
        raise InputError(f"--batch-timeout-ms {config.batch_timeout_ms} must be shorter than --request-timeout-s "
                         f"{config.request_timeout_s}.")
    if config.dtype not in DTYPES:
        raise InputError(f"--dtype {config.dtype} is not one of {', '.join(DTYPES)}.")


def _accelerator(device: str) -> str:
    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"--device {device} is not one of auto, cpu, cuda (cuda serves every visible GPU; pick GPUs "
                         "with CUDA_VISIBLE_DEVICES).")
    if device == "cpu":
        return "cpu"
    if cuda_available():
        return "cuda"
    if device == "cuda":
        raise InputError("--device cuda was asked for but CUDA is not available; use --device cpu.")
    return "cpu"


def _lrm_inputs(lrm: Path) -> tuple[tuple[int, ...], int, bool, str]:
    """The latent shape [C, H, W] the LRM takes, its number of diffusion timesteps, whether they are continuous
    (flow matching) and its family, from its files alone."""

    config = read_lrm_config(lrm)
    source, subfolder = resolve_lrm(lrm)
    scheduler = Path(source) / (subfolder or "") / "scheduler" / "scheduler_config.json"
    steps = DEFAULT_NUM_TIMESTEPS
    if scheduler.is_file():
        steps = int(json.loads(scheduler.read_text()).get("num_train_timesteps", DEFAULT_NUM_TIMESTEPS))
    return tuple(config["latent_shape"]), steps, get_family(config["family"]).flow_matching, config["family"]


def validate(config: ServeConfig) -> ServePlan:
    """Check everything that can be checked before a model loads: address, token, limits, models."""

    if config.lrm is None and not config.metrics:
        raise InputError("nothing to serve: pass --lrm DIR, --metrics (e.g. pickscore,clip), or both.")
    host, token = _check_bind(config)
    _check_options(config)
    specs: dict[str, str | None] = {}
    if config.metrics:
        specs = validate_models(ScoreConfig(metrics=list(config.metrics), models=dict(config.models),
                                            models_dir=config.models_dir))
    elif config.models:
        raise InputError(f"models given for {sorted(config.models)} but no --metrics; add them to --metrics.")
    latent_shape, steps, continuous, family = (_lrm_inputs(Path(config.lrm)) if config.lrm is not None
                                               else (None, DEFAULT_NUM_TIMESTEPS, False, None))
    return ServePlan(specs, host, token, _accelerator(config.device), latent_shape, steps, continuous, family)


def serves_drm(config: ServeConfig, plan: ServePlan) -> bool:
    return config.lrm is not None and plan.continuous and config.drm


def unserved_routes(config: ServeConfig, plan: ServePlan) -> dict[str, str]:
    """Why this server does not answer protocol v1, where it does not (the gateway's 404 message)."""
    if serves_drm(config, plan):
        return {}
    if config.lrm is None:
        why = "this server has no latent reward model (start it with --lrm DIR, an sd3 or flux LRM)"
    elif not plan.continuous:
        why = (f"this server's reward model is a {plan.family} LRM: protocol v1 noises a clean latent by the "
               "flow-matching forward process to sigma = u and scores it from the prompt embeddings of an SD3/FLUX "
               "pipeline, which a DDPM-trained UNet LRM was never trained on; serve an sd3 or flux LRM, or send "
               f"noisy latents with timesteps to {LATENTS_ROUTE}")
    else:
        why = "this server was started with --no-drm; restart it without that option"
    return {DRM_ROUTE: f"{DRM_ROUTE} is not served: {why}."}


def limits(config: ServeConfig, plan: ServePlan) -> dict[str, Any]:
    """The request limits clients see in GET /models."""
    return {
        "max_items_per_request": config.max_items_per_request,
        "max_request_bytes": int(config.max_request_mb * 2**20),
        "max_batch_size": config.max_batch_size,
        "batch_timeout_ms": config.batch_timeout_ms,
        "latent_shape": list(plan.latent_shape) if plan.latent_shape else None,
        "timesteps": timestep_range(plan.num_timesteps, plan.continuous),
    }


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _stop_on_signal(server: Any, main_pid: int) -> Any:
    """A SIGTERM and SIGINT (Ctrl+C) handler that shuts LitServe down the way its /shutdown route does: it sets the
    server's shutdown event (from a new thread: the main thread is inside the event's wait). The forked HTTP
    processes, where uvicorn re-raises the signal once it has drained its connections, just exit; the inference
    workers ignore SIGINT and are stopped by the main process."""

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != main_pid:
            raise SystemExit(0)
        event = getattr(server, "_shutdown_event", None)
        if event is None:  # still starting: LitServe also shuts down on KeyboardInterrupt
            raise KeyboardInterrupt
        threading.Thread(target=event.set, daemon=True).start()

    return handler


def run(config: ServeConfig) -> None:
    """Validate, then serve until Ctrl+C or SIGTERM, which shut every worker down; raise ServeFailed if a worker
    fails."""
    plan = validate(config)

    verbose = logger.isEnabledFor(logging.DEBUG)
    drm = serves_drm(config, plan)
    routes = bool(plan.specs) + (config.lrm is not None) + drm
    with multiprocessing.Manager() as manager:
        registry, stats = manager.dict(), manager.dict()  # filled by the workers, read by GET /models and /stats
        shared = {"registry": registry, "stats": stats, "max_batch_size": config.max_batch_size,
                  "batch_timeout": config.batch_timeout_ms / 1000, "dtype": config.dtype,
                  "max_items": config.max_items_per_request, "log_level": logging.getLogger("lpo").level,
                  "cpu_threads": max(1, _cores() // (routes * config.workers_per_device))}
        litapis = []
        if plan.specs:
            litapis.append(apis.ImageScoreAPI(specs=plan.specs, **shared))
        if config.lrm is not None:
            litapis.append(apis.LatentScoreAPI(lrm=str(config.lrm), latent_shape=plan.latent_shape,
                                               num_timesteps=plan.num_timesteps, continuous=plan.continuous,
                                               **shared))
        if drm:
            litapis.append(apis.DRMScoreAPI(lrm=str(config.lrm), latent_shape=plan.latent_shape,
                                            num_timesteps=plan.num_timesteps, **shared))
        checks = {"token": plan.token, "max_bytes": int(config.max_request_mb * 2**20),
                  "unserved": unserved_routes(config, plan)}
        server = ls.LitServer(litapis, accelerator=plan.accelerator, devices="auto",
                              workers_per_device=config.workers_per_device, timeout=config.request_timeout_s,
                              healthcheck_path="/ready", middlewares=[(gateway.Gateway, checks)])
        apis.add_routes(server.app, registry, stats, limits(config, plan),
                       expected={**{m: IMAGES_ROUTE for m in plan.specs},
                                 **({"lrm": LATENTS_ROUTE} if config.lrm is not None else {}),
                                 **({"drm": DRM_ROUTE} if drm else {})})
        shown = f"[{plan.host}]" if ":" in plan.host else plan.host
        logger.info("serving %s on http://%s:%d (%s, max batch %d, %s ms); routes %s", ", ".join(
            [*plan.specs, *(["lrm"] if config.lrm is not None else []),
             *(["lrm (protocol v1)"] if drm else [])]), shown, config.port, plan.accelerator,
            config.max_batch_size, config.batch_timeout_ms, ", ".join(a.api_path for a in litapis))
        stop = _stop_on_signal(server, os.getpid())
        previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
        try:
            server.run(host=plan.host, port=config.port, generate_client_file=False,
                       log_level="info" if verbose else "warning")
        except (RuntimeError, EOFError, ConnectionError) as err:
            # RuntimeError: a worker failed in setup before any was ready; EOFError/ConnectionError: LitServe's
            # monitor saw a worker die (in setup or later), shut the server down and took its manager with it.
            for worker in getattr(server, "inference_workers", []):
                worker.terminate()
                worker.join(timeout=10)
            raise ServeFailed(f"an inference worker failed or died ({type(err).__name__}: {err}); its error is "
                              "logged above. The server has stopped.") from None
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
