"""The options of `lpo reward serve` (a module of its own, so the command line reads them without the server)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lpo.core.config import option
from lpo.reward.serve.protocol import TOKEN_ENV


@dataclass
class ServeConfig:
    lrm: Path | None = option(None, "Latent reward model (a folder or run directory of `lpo reward train`, or a "
                                    "hub id), served on POST /score/latents.")
    metrics: list[str] = option(help="Image metrics served on POST /score/images: pickscore, clip, vqa, aesthetic.",
                                factory=list)
    models: dict[str, str] = option(
        help="Model per metric (hub id or local directory); unset metrics use --models-dir or the registry default.",
        factory=dict)
    models_dir: Path | None = option(None, "A directory with one model folder per metric (as `lpo dev tiny-models` "
                                           "writes); used for metrics without an explicit model.")
    host: str = option("127.0.0.1", "Address to bind: 127.0.0.1 (loopback), 0.0.0.0 or :: (every interface; needs "
                                    "a token).")
    port: int = option(8000, "TCP port (1024-65535).")
    token: str | None = option(None, f"Bearer token clients must send. Required off loopback; prefer the {TOKEN_ENV} "
                                     "environment variable (a token on the command line shows in `ps`).")
    drm: bool = option(True, "With a flow-matching --lrm (sd3, flux): also answer VeRL-Omni's latent-reward protocol "
                             "v1 on POST /drm/v1/score (its worker holds a second copy of the LRM).")
    max_batch_size: int = option(8, "Requests a worker gathers into one model call (1 turns batching off).")
    batch_timeout_ms: float = option(10.0, "How long a worker waits to fill a batch before it runs what it has.")
    workers_per_device: int = option(1, "Inference workers per device and route (each holds its own model copy).")
    device: str = option("auto", "Device: auto (every visible GPU, else CPU), cpu or cuda (every visible GPU).")
    dtype: str = option("auto", "Model dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, float16, bfloat16.")
    max_items_per_request: int = option(64, "Most images or latents one request may carry (more: 422).")
    max_request_mb: float = option(64.0, "Largest request body in MiB (more: 413).")
    request_timeout_s: float = option(60.0, "Seconds a request may wait for a worker before it gets a 504.")
