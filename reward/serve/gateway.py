"""The HTTP gateway of `lpo reward serve`: what can be checked without a model is answered before a request is
queued: the bearer token (401), the body size (413), the content type (415), JSON and multipart syntax (400).

It also hands LitServe one canonical JSON body per route, whatever the client sent:
- ``/score/images``: ``{"metric": str, "prompts": [str], "images": [base64 of encoded image files]}``;
- ``/score/latents``: ``{"latents": {"data": base64, "shape": [B, C, H, W], "dtype": str} | {"safetensors":
  base64}, "timesteps": [int], "prompts": [str]}`` or ``{"safetensors": base64}`` (tensors ``latents`` and
  ``timesteps``, prompts as JSON in the file's ``__metadata__["prompts"]``);
- ``/drm/v1/score`` (VeRL-Omni's latent-reward protocol): ``{"safetensors": base64}`` once the version header
  (``x-drm-protocol-version: 1``, else 400) and the binary content type (else 415) have been checked.

A route the server does not serve for its model (protocol v1 on a UNet LRM) is answered 404 with the reason.
"""

from __future__ import annotations

import base64
import email
import email.policy
import hmac
import json
from typing import Any
from urllib.parse import parse_qs

from lpo.reward.serve.protocol import (
    DRM_HEADER,
    DRM_ROUTE,
    DRM_VERSION,
    IMAGES_ROUTE,
    LATENTS_ROUTE,
    OPEN_PATHS,
    SAFETENSORS_TYPES,
    Rejected,
)

DRAIN_FACTOR = 8  # an oversized body is read and dropped up to this multiple of the limit, so the client sees the 413


class Gateway:
    """ASGI middleware: bearer token (401), body size (413), content type (415), JSON and multipart syntax (400),
    and the rewrite of multipart, raw-image and safetensors bodies into the route's canonical JSON."""

    def __init__(self, app: Any, *, token: str | None, max_bytes: int, unserved: dict[str, str] | None = None) -> None:
        self.app = app
        self.token = token
        self.max_bytes = max_bytes
        self.unserved = dict(unserved or {})  # route -> why this server does not answer it

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope["headers"]}
        if self.token is not None and scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            await _reply(send, 401, "missing or wrong bearer token: send the header 'Authorization: Bearer <token>' "
                         "with the server's --token (or LPO_REWARD_TOKEN)", [(b"www-authenticate", b"Bearer")])
            return
        if scope["path"] in self.unserved:
            await _reply(send, 404, self.unserved[scope["path"]])
            return
        if scope["method"] != "POST" or scope["path"] not in (IMAGES_ROUTE, LATENTS_ROUTE, DRM_ROUTE):
            await self.app(scope, receive, send)
            return
        if scope["path"] == DRM_ROUTE:
            version = headers.get(DRM_HEADER.encode(), b"").decode("latin-1").strip()
            if version != DRM_VERSION:
                said = f"says version {version!r}" if version else f"has no {DRM_HEADER} header"
                await _reply(send, 400, f"the request {said}; this route speaks VeRL-Omni's latent-reward protocol "
                                        f"version {DRM_VERSION}: send the header '{DRM_HEADER}: {DRM_VERSION}'")
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
    if path == DRM_ROUTE:
        if media not in SAFETENSORS_TYPES:
            raise Rejected(415, f"Content-Type {media!r} is not accepted on {path}; protocol v1 sends a safetensors "
                                f"file as {' or '.join(SAFETENSORS_TYPES)}")
        return json.dumps({"safetensors": _b64(body)}).encode()
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
        raise Rejected(400, f"malformed JSON body ({err}); send one JSON object (docs/serving.md)") from None
    if not isinstance(value, dict):
        raise Rejected(422, f"the JSON body is a {type(value).__name__}; send one JSON object with the route's fields")


def _multipart_images(content_type: str, body: bytes) -> dict[str, Any]:
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
