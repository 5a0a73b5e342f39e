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


class Rejected(Exception):
    """A request the server will not score: its HTTP status and a message naming the problem and the fix."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def timestep_range(num_timesteps: int, continuous: bool) -> list:
    """[low, high] of the timesteps a latent reward model takes, as GET /models shows it."""
    return [0.0, float(num_timesteps)] if continuous else [0, num_timesteps - 1]
