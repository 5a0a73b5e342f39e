"""The reward service's protocol, shared by the server and the client (standard library only): routes, the token's
environment variable, the latent dtypes accepted, and the refusal every check raises."""

from __future__ import annotations

TOKEN_ENV = "LPO_REWARD_TOKEN"
IMAGES_ROUTE = "/score/images"
LATENTS_ROUTE = "/score/latents"
OPEN_PATHS = ("/health", "/ready")  # liveness and readiness probes answer without a token
LATENT_DTYPES = ("float32", "float16", "bfloat16")
SAFETENSORS_TYPES = ("application/x-safetensors", "application/octet-stream")
DEFAULT_NUM_TIMESTEPS = 1000

# VeRL-Omni's latent-reward ("DRM") protocol, version 1: a safetensors body (latents [1, C, H, W] clean,
# prompt_embeds [1, L, D], pooled_prompt_embeds [1, D], u [1] in [0, 1], optional seeds [1] int64), answered with
# {"protocol_version": "1", "raw_scores": [float]}.
DRM_ROUTE = "/drm/v1/score"
DRM_HEADER = "x-drm-protocol-version"
DRM_VERSION = "1"
DRM_TENSORS = {"latents": 4, "prompt_embeds": 3, "pooled_prompt_embeds": 2, "u": 1}  # name -> rank
DRM_OPTIONAL = {"seeds": 1}


class Rejected(Exception):
    """A request the server will not score: its HTTP status and a message naming the problem and the fix."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def timestep_range(num_timesteps: int, continuous: bool) -> list:
    """[low, high] of the timesteps a latent reward model takes, as GET /models shows it."""
    return [0.0, float(num_timesteps)] if continuous else [0, num_timesteps - 1]
