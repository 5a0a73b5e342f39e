"""`lpo reward serve` end to end: real LitServe servers on tiny models, the client, bad input, batching, the token."""

from __future__ import annotations

import base64
import http.server
import io
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save
from typer.testing import CliRunner

from lpo.cli import app
from lpo.reward.serve.client import RewardClient, RewardServiceError
from lpo.reward.serve.server import ServeConfig, resolve_token

REPO = Path(__file__).resolve().parents[3]
METRICS = ("pickscore", "clip", "vqa", "aesthetic")
MAX_ITEMS = 16
MAX_REQUEST_MB = 2
TOKEN = "s3cret-token"
# Served scores equal the in-process ones to float32 rounding, not bit for bit: CPU kernels round differently with the
# batch size and the thread count (each server worker gets a share of the cores), and the LRM's feature guidance
# (x7.5) amplifies that. A wrong image, prompt or order moves a score by far more.
RTOL, ATOL = 1e-5, 1e-4


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """Starts `lpo reward serve` subprocesses (each in its own process group) and stops them, checking that no
    process of the group outlives the server."""
    started: list[subprocess.Popen] = []

    def start(*args: str, timeout: float = 240) -> str:
        port = _free_port()
        log = tmp_path_factory.mktemp("serve") / "server.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("LPO_REWARD_TOKEN", None)
        with open(log, "wb") as sink:
            proc = subprocess.Popen([sys.executable, "-m", "lpo", "reward", "serve", "--port", str(port),
                                     "--device", "cpu", *map(str, args)], cwd=REPO, env=env, stdout=sink,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        started.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while RewardClient(url)._get_status("/ready") != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the server did not become ready:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
        return url

    yield start
    for proc in started:
        proc.send_signal(signal.SIGTERM)
    for proc in started:
        try:
            proc.wait(timeout=60)
        finally:
            deadline = time.monotonic() + 20
            while _group_alive(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            orphans = _group_alive(proc.pid)
            if orphans:
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode == 0 and not orphans, "the server did not shut down cleanly"


@pytest.fixture(scope="module")
def lrm_dir(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lpo.reward.lrm.model import LatentRewardModel

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("lrm")
    LatentRewardModel.from_base(str(tiny_models_dir / "sd15"), text_projection_init=None).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def url(start_server, tiny_models_dir: Path, lrm_dir: Path) -> str:
    return start_server("--lrm", lrm_dir, "--metrics", ",".join(METRICS), "--models-dir", tiny_models_dir,
                        "--max-batch-size", "8", "--batch-timeout-ms", "100", "--max-items-per-request", MAX_ITEMS,
                        "--max-request-mb", MAX_REQUEST_MB)


@pytest.fixture(scope="module")
def client(url: str) -> RewardClient:
    return RewardClient(url, retries=1, backoff=0.1)


@pytest.fixture(scope="module")
def scorers(tiny_models_dir: Path) -> dict:
    from lpo.curate.scorers import load_scorer

    return {metric: load_scorer(metric, str(tiny_models_dir / metric)) for metric in METRICS}


@pytest.fixture(scope="module")
def lrm(lrm_dir: Path):
    from lpo.reward.lrm.model import LatentRewardModel

    return LatentRewardModel.from_pretrained(lrm_dir)


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(40, 40), (64, 48), (33, 70)]
    images = [Image.fromarray(rng.integers(0, 256, (*sizes[i % 3], 3), dtype=np.uint8)) for i in range(n)]
    if n > 1:
        images[1] = images[1].convert("RGBA")
    if n > 2:
        images[2] = images[2].convert("L")
    return images


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _post(url: str, body: bytes | dict, content_type: str = "application/json",
          headers: dict | None = None, method: str = "POST") -> tuple[int, dict]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, data=data if method == "POST" else None, method=method,
                                     headers={"Content-Type": content_type, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _good_image_request(seed: int = 0) -> dict:
    return {"metric": "clip", "images": [_b64(_png(image)) for image in _images(2, seed)],
            "prompts": ["a red circle", "two blue squares"]}


def _latent_json(latents: torch.Tensor, dtype: str = "float32") -> dict:
    return {"data": _b64(latents.contiguous().numpy().tobytes()), "shape": list(latents.shape), "dtype": dtype}


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of sockets listening on `port`, from /proc/net (hex, as the kernel writes them)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            address, hexport = local.rsplit(":", 1)
            if state == "0A" and int(hexport, 16) == port:
                found.add(address)
    return found


# ---------------------------------------------------------------------------------------------------------------
# scores over HTTP equal the in-process models


def test_image_scores_equal_the_in_process_scorers(client: RewardClient, url: str, scorers: dict) -> None:
    images = _images(5)
    prompts = ["a red circle", "two blue squares", "a green triangle on white", "noise", "a cat"]
    for metric, scorer in scorers.items():
        served = client.score_images(metric, images, prompts)
        assert served.dtype == np.float64
        np.testing.assert_allclose(served, scorer.score(images, prompts), rtol=RTOL, atol=ATOL)
    # the same image as a JSON data URL, a multipart file and a raw image body: the same request to the model
    png = _png(images[0])
    status, body = _post(url + "/score/images", {"metric": "pickscore", "prompts": prompts[:1],
                                                 "images": ["data:image/png;base64," + _b64(png)]})
    assert status == 200
    expected = body["scores"]
    np.testing.assert_allclose(expected, scorers["pickscore"].score(images[:1], prompts[:1]), rtol=RTOL, atol=ATOL)
    boundary = "lpo-test-boundary"
    multipart = (f'--{boundary}\r\nContent-Disposition: form-data; name="metric"\r\n\r\npickscore\r\n'
                 f'--{boundary}\r\nContent-Disposition: form-data; name="prompts"\r\n\r\n{prompts[0]}\r\n'
                 f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n'
                 'Content-Type: image/png\r\n\r\n').encode() + png + f"\r\n--{boundary}--\r\n".encode()
    status, body = _post(url + "/score/images", multipart, f"multipart/form-data; boundary={boundary}")
    assert status == 200 and body["scores"] == expected, body
    query = urllib.parse.urlencode({"metric": "pickscore", "prompt": prompts[0]})
    status, body = _post(f"{url}/score/images?{query}", png, "image/png")
    assert status == 200 and body["scores"] == expected and body["metric"] == "pickscore"


def test_latent_scores_equal_the_in_process_lrm(client: RewardClient, url: str, lrm) -> None:
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(5, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([1, 251, 501, 751, 951])
    prompts = ["a red circle", "two blue squares", "a green triangle", "noise", "a cat"]
    with torch.no_grad():
        expected = lrm.score(latents, timesteps, prompts)
    served = client.score_latents(latents, timesteps, prompts)
    assert served.dtype == expected.dtype and served.shape == expected.shape
    torch.testing.assert_close(served, expected, rtol=RTOL, atol=ATOL)
    # one int timestep for all, float16 latents, and the JSON form with raw data (the same request: the same scores)
    with torch.no_grad():
        expected_half = lrm.score(latents.half(), 501, prompts)
    torch.testing.assert_close(client.score_latents(latents.half(), 501, prompts), expected_half, rtol=RTOL,
                               atol=ATOL)
    status, body = _post(url + "/score/latents", {"latents": _latent_json(latents), "timesteps": timesteps.tolist(),
                                                  "prompts": prompts})
    assert status == 200 and body["scores"] == served.tolist() and body["dtype"] == "float32"


def test_client_splits_large_inputs_within_the_server_limits(client: RewardClient, lrm) -> None:
    n = 2 * MAX_ITEMS + 3
    latents = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    timesteps = torch.arange(n) * 20
    prompts = [f"prompt number {i}" for i in range(n)]
    # a route's statistics appear with its first request (this test may be the first on its worker's server)
    before = client.stats().get("/score/latents", {}).get("requests", 0)
    served = client.score_latents(latents, timesteps, prompts)
    assert client.stats()["/score/latents"]["requests"] - before == 3  # 16 + 16 + 3
    with torch.no_grad():
        expected = lrm.score(latents, timesteps, prompts)
    torch.testing.assert_close(served, expected, rtol=RTOL, atol=ATOL)


def test_models_lists_ids_scales_and_limits(client: RewardClient, scorers: dict, tiny_models_dir: Path,
                                            lrm_dir: Path) -> None:
    listing = client.models()
    assert listing["loaded"] is True
    by_name = {m["name"]: m for m in listing["models"]}
    assert set(by_name) == {*METRICS, "lrm"}
    for metric, scorer in scorers.items():
        assert by_name[metric]["model_id"] == str(tiny_models_dir / metric) == scorer.model_id
        assert by_name[metric]["scale"] == scorer.scale and by_name[metric]["route"] == "/score/images"
        assert by_name[metric]["devices"] == ["cpu"] and by_name[metric]["dtype"] == "float32"
    assert by_name["lrm"]["model_id"] == str(lrm_dir) and by_name["lrm"]["latent_shape"] == [4, 8, 8]
    assert listing["limits"]["max_items_per_request"] == MAX_ITEMS
    assert listing["limits"]["max_request_bytes"] == MAX_REQUEST_MB * 2**20
    assert client.health() and client.ready()


def test_the_default_server_listens_on_loopback_only(url: str) -> None:
    addresses = _listening_addresses(int(url.rsplit(":", 1)[1]))
    if not addresses:
        pytest.skip("no /proc/net/tcp to read listening sockets from")
    assert addresses == {"0100007F"}  # 127.0.0.1


# ---------------------------------------------------------------------------------------------------------------
# batching, and bad requests inside a batch


def _send_together(url: str, bodies: list[dict]) -> list[tuple[int, dict]]:
    """POST every body at once, from one thread each."""
    barrier = threading.Barrier(len(bodies))

    def send(body: dict) -> tuple[int, dict]:
        barrier.wait()
        return _post(url, body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(send, bodies))


def test_concurrent_requests_are_batched_and_bad_ones_do_not_poison_their_batch(url: str, client: RewardClient,
                                                                                 scorers: dict) -> None:
    good = [_good_image_request(seed) for seed in range(5)]
    bad = [
        ({**good[0], "metric": "hps"}, "unknown metric 'hps'"),
        ({**good[0], "prompts": ["a red circle", "  "]}, "prompts[1] is empty"),
        ({**good[0], "images": [good[0]["images"][0], _b64(b"not an image at all")]}, "images[1]"),
    ]
    expected = [scorers["clip"].score(_images(2, seed), request["prompts"]) for seed, request in enumerate(good)]
    for _attempt in range(3):
        # a route publishes its statistics with its first batch: none yet when this test runs first
        before = client.stats().get("/score/images", {"requests": 0, "batches": 0})
        requests = [*good, *(request for request, _ in bad)]
        answers = _send_together(url + "/score/images", requests)
        for (status, body), scores in zip(answers, expected):
            assert status == 200
            np.testing.assert_allclose(body["scores"], scores, rtol=RTOL, atol=ATOL)
        for (status, body), (_, needle) in zip(answers[len(good):], bad):
            assert status == 422 and needle in body["detail"]
        after = client.stats()["/score/images"]
        assert after["requests"] - before["requests"] == len(requests)
        new_batches = after["recent"][-(after["batches"] - before["batches"]):]
        assert max(size for size, _ in new_batches) > 1, f"no batching: {new_batches}"
        if any(0 < rejected < size for size, rejected in new_batches):
            return  # a batch held good and bad requests, and every request got its own answer
    pytest.fail(f"no batch mixed good and bad requests in 3 bursts: {new_batches}")


def test_a_model_failure_fails_only_its_request() -> None:
    from lpo.reward.serve.apis import _ScoringAPI
    from lpo.reward.serve.protocol import Rejected

    class Flaky(_ScoringAPI):
        route = "/flaky"

        def load(self, device: str) -> dict:
            return {}

        def score(self, requests: list) -> list:
            if "boom" in requests:
                raise RuntimeError("CUDA error: device-side assert")
            return [{"scores": [len(r)]} for r in requests]

    api = Flaky(registry={}, stats={}, max_batch_size=4, batch_timeout=0.01, dtype="auto", max_items=8, log_level=0)
    api.setup("cpu")
    rejected = Rejected(422, "prompts[0] is empty")
    outputs = api.predict(["ok", rejected, "boom", "okay"])
    assert outputs[0] == {"scores": [2]} and outputs[3] == {"scores": [4]} and outputs[1] is rejected
    assert outputs[2].status == 500 and "device-side assert" in outputs[2].detail
    assert api.encode_response(outputs[2]).status_code == 500
    assert api.predict("okay") == {"scores": [4]}  # max_batch_size 1: LitServe passes one request, not a list
    assert api.stats["/flaky#" + str(os.getpid())]["batch_sizes"] == {"4": 1, "1": 1}


def _latent_request(**change) -> dict:
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return {"latents": _latent_json(latents), "timesteps": [1, 951], "prompts": ["a red circle", "a cat"], **change}


def _safetensors_body(latents: torch.Tensor, timesteps: torch.Tensor, prompts: list[str]) -> bytes:
    return save({"latents": latents, "timesteps": timesteps}, metadata={"prompts": json.dumps(prompts)})


BAD_REQUESTS = [
    ("/score/images", b'{"metric": "clip", "images": [', "application/json", 400, "malformed JSON"),
    ("/score/images", b'["clip"]', "application/json", 422, "JSON object"),
    ("/score/images", {"metric": "clip", "images": [_b64(b"GIF89a-but-not-really")], "prompts": ["a"]},
     "application/json", 422, "images[0] (21 bytes) is not an image"),
    ("/score/images", {"metric": "clip", "images": ["%%%"], "prompts": ["a"]}, "application/json", 422,
     "images[0] is not valid base64"),
    ("/score/images", {"metric": "hps", "images": [], "prompts": []}, "application/json", 422,
     "unknown metric 'hps': this server scores pickscore, clip, vqa, aesthetic"),
    ("/score/images", {"metric": "clip", "images": [_b64(b"x")], "prompts": [""]}, "application/json", 422,
     "prompts[0] is empty"),
    ("/score/images", {"metric": "clip", "images": [_b64(b"x")] * 2, "prompts": ["a"]}, "application/json", 422,
     "2 images but 1 prompts"),
    ("/score/images", {"metric": "clip", "images": [_b64(b"x")] * (MAX_ITEMS + 1), "prompts": ["a"] * (MAX_ITEMS + 1)},
     "application/json", 422, f"over the server's limit of {MAX_ITEMS}"),
    ("/score/images", {"metric": "clip", "image": [], "prompts": []}, "application/json", 422,
     "unknown field(s) ['image']"),
    ("/score/images", b"x" * (MAX_REQUEST_MB * 2**20 + 1), "application/json", 413, "over the server's limit of"),
    ("/score/images", b"hello", "text/plain", 415, "Content-Type 'text/plain' is not accepted"),
    ("/score/latents", _latent_request(latents=_latent_json(torch.zeros(2, 4, 16, 8))), "application/json", 422,
     "latents have shape [2, 4, 16, 8]; this model takes [B, 4, 8, 8]"),
    ("/score/latents", _latent_request(latents=_latent_json(torch.zeros(2, 4, 8, 8, dtype=torch.int64), "int64")),
     "application/json", 422, "latents dtype 'int64' is not accepted"),
    ("/score/latents", _safetensors_body(torch.zeros(2, 4, 8, 8, dtype=torch.float64), torch.tensor([1, 2]),
                                         ["a", "b"]),
     "application/x-safetensors", 422, "latents dtype float64 is not accepted"),
    ("/score/latents", _latent_request(latents={**_latent_json(torch.zeros(2, 4, 8, 8)), "shape": [3, 4, 8, 8]}),
     "application/json", 422, "needs 3072"),
    ("/score/latents", _latent_request(timesteps=[1, 1000]), "application/json", 422, "go outside [0, 999]"),
    ("/score/latents", _latent_request(timesteps=[1]), "application/json", 422, "2 latents but 1 timesteps"),
    ("/score/latents", _latent_request(prompts=["a", ""]), "application/json", 422, "prompts[1] is empty"),
    ("/score/latents", _latent_request(latents=_latent_json(torch.full((2, 4, 8, 8), float("nan")))),
     "application/json", 422, "NaN"),
    ("/score/latents", b"definitely not safetensors", "application/x-safetensors", 422,
     "not a readable safetensors file"),
]


@pytest.mark.parametrize(("route", "body", "content_type", "status", "needle"), BAD_REQUESTS,
                         ids=[f"{r[0].rsplit('/', 1)[1]}-{r[4][:30]}" for r in BAD_REQUESTS])
def test_bad_input_gets_a_4xx_naming_the_problem_and_the_server_keeps_serving(
        url: str, route: str, body, content_type: str, status: int, needle: str) -> None:
    got, answer = _post(url + route, body, content_type)
    assert got == status and needle in answer["detail"], answer
    good = _good_image_request() if route == "/score/images" else _latent_request()
    got, answer = _post(url + route, good)
    assert got == 200 and len(answer["scores"]) == 2


# ---------------------------------------------------------------------------------------------------------------
# the token off loopback


@pytest.mark.slow  # several processes (or a server) started: in the full run, not the quick loop
def test_a_token_is_required_off_loopback(start_server, tiny_models_dir: Path) -> None:
    url = start_server("--host", "0.0.0.0", "--token", TOKEN, "--metrics", "clip", "--models-dir", tiny_models_dir)
    addresses = _listening_addresses(int(url.rsplit(":", 1)[1]))
    assert not addresses or addresses == {"00000000"}  # 0.0.0.0
    assert _post(url + "/models", b"", method="GET")[0] == 401
    assert _post(url + "/models", b"", method="GET", headers={"Authorization": "Bearer wrong"})[0] == 401
    status, body = _post(url + "/score/images", _good_image_request())
    assert status == 401 and "Authorization: Bearer" in body["detail"]
    assert _post(url + "/models", b"", method="GET", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
    status, body = _post(url + "/score/images", _good_image_request(), headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and len(body["scores"]) == 2
    assert _post(url + "/health", b"", method="GET")[0] == 200  # probes stay open
    assert len(RewardClient(url, token=TOKEN).score_images("clip", _images(3), ["a", "b", "c"])) == 3
    with pytest.raises(RewardServiceError) as refused:
        RewardClient(url, token=None, max_items_per_request=4, max_request_bytes=2**20).score_images(
            "clip", _images(1), ["a"])
    assert refused.value.status == 401


@pytest.mark.parametrize(("args", "needle"), [
    (["--host", "0.0.0.0", "--metrics", "clip"], "pass --token SECRET or set LPO_REWARD_TOKEN"),
    (["--host", "10.1.2.3", "--metrics", "clip"], "--host 10.1.2.3 is not one LitServe can bind"),
    (["--metrics", "clip", "--token", " "], "the bearer token is empty"),
    ([], "nothing to serve"),
    (["--metrics", "clip,hps"], "unknown metric(s) ['hps']"),
    (["--metrics", "clip", "--batch-timeout-ms", "0"], "--batch-timeout-ms 0.0 must be above 0"),
    (["--metrics", "clip", "--port", "80"], "--port 80 is outside 1024-65535"),
    (["--metrics", "clip", "--dtype", "float64"], "--dtype float64 is not one of"),
    (["--lrm", "{tiny}/sd15"], "is not a latent reward model directory"),
])
def test_bad_serve_options_exit_2_before_loading_models(args: list[str], needle: str, tiny_models_dir: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LPO_REWARD_TOKEN", raising=False)
    args = [a.replace("{tiny}", str(tiny_models_dir)) for a in args]
    port = [] if "--port" in args else ["--port", str(_free_port())]
    result = CliRunner().invoke(app, ["reward", "serve", "--models-dir", str(tiny_models_dir), *port, *args])
    assert result.exit_code == 2, result.output
    assert needle in " ".join(result.output.split())


@pytest.mark.slow  # several processes (or a server) started: in the full run, not the quick loop
def test_a_model_that_fails_to_load_stops_the_server_with_exit_code_1(lrm_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "lrm"
    broken.mkdir()
    for item in lrm_dir.iterdir():
        (broken / item.name).symlink_to(item)
    weights = broken / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    weights.write_bytes(b"not a safetensors file")  # the config is fine: validation passes
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lpo", "reward", "serve", "--lrm", str(broken), "--device", "cpu",
                             "--port", str(_free_port())], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output = proc.communicate(timeout=180)[0].decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1 and "reward service failed: an inference worker failed" in output, output[-3000:]
    deadline = time.monotonic() + 20
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _group_alive(proc.pid), "worker processes outlived the failed server"


def test_a_port_in_use_exits_2(tiny_models_dir: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = CliRunner().invoke(app, ["reward", "serve", "--metrics", "clip", "--models-dir", str(tiny_models_dir),
                                          "--port", str(port)])
    assert result.exit_code == 2 and f"cannot bind 127.0.0.1:{port}" in " ".join(result.output.split())


def test_the_token_can_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LPO_REWARD_TOKEN", "from-env")
    assert resolve_token(ServeConfig()) == "from-env"
    assert resolve_token(ServeConfig(token="given")) == "given"
    monkeypatch.delenv("LPO_REWARD_TOKEN")
    assert resolve_token(ServeConfig()) is None


# ---------------------------------------------------------------------------------------------------------------
# the client's retries, against a stub server


class _Stub(http.server.BaseHTTPRequestHandler):
    """Answers POST /score/images with one score per image; `plan` lists what to do with each request in turn."""

    plan: list[str] = []
    seen: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 - the name http.server dispatches to
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        action = self.plan.pop(0) if self.plan else "ok"
        self.seen.append(action)
        if action == "drop":  # close the connection without an answer
            self.close_connection = True
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        status = int(action) if action.isdigit() else 200
        answer = {"detail": f"stub says {status}"} if status != 200 else {"scores": [0.25] * len(body["images"])}
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def _serve_stub(port: int, plan: list[str], delay: float = 0.0) -> dict:
    """Start the stub on `port` after `delay` seconds, in a thread; the returned dict gets its "server"."""
    _Stub.plan, _Stub.seen = list(plan), []
    holder: dict = {}

    def run() -> None:
        time.sleep(delay)
        holder["server"] = http.server.HTTPServer(("127.0.0.1", port), _Stub)
        holder["server"].serve_forever(poll_interval=0.05)

    threading.Thread(target=run, daemon=True).start()
    return holder


def _stub_client(port: int, retries: int = 6) -> RewardClient:
    return RewardClient(f"http://127.0.0.1:{port}", retries=retries, backoff=0.1, max_items_per_request=8,
                        max_request_bytes=2**20)


@pytest.mark.parametrize(("plan", "delay", "attempts"), [
    ([], 0.6, 1),  # nothing listens at first: connection refused, then the server comes up
    (["drop"], 0.0, 2),  # the connection closes without an answer
    (["503", "502"], 0.0, 3),  # not ready / bad gateway
])
def test_the_client_retries_connection_errors(plan: list[str], delay: float, attempts: int,
                                              caplog: pytest.LogCaptureFixture) -> None:
    port = _free_port()
    holder = _serve_stub(port, plan, delay)
    try:
        with caplog.at_level(logging.WARNING, logger="reward.client"):
            scores = _stub_client(port).score_images("clip", _images(2), ["a", "b"])
        assert scores.tolist() == [0.25, 0.25]
        assert len(_Stub.seen) == attempts
        assert sum("retrying" in r.message for r in caplog.records) >= 1
    finally:
        while "server" not in holder:
            time.sleep(0.05)
        holder["server"].shutdown()
        holder["server"].server_close()


def test_the_client_does_not_retry_a_4xx_and_gives_up_on_a_dead_server() -> None:
    port = _free_port()
    holder = _serve_stub(port, ["422"])
    try:
        while "server" not in holder:
            time.sleep(0.05)
        with pytest.raises(RewardServiceError, match="422: stub says 422") as refused:
            _stub_client(port).score_images("clip", _images(1), ["a"])
        assert refused.value.status == 422 and _Stub.seen == ["422"]
    finally:
        holder["server"].shutdown()
        holder["server"].server_close()
    with pytest.raises(RewardServiceError, match="after 3 attempts") as unreachable:
        _stub_client(_free_port(), retries=2).score_images("clip", _images(1), ["a"])
    assert unreachable.value.status is None


# ---------------------------------------------------------------------------------------------------------------
# --reward-url: trainers and evaluation use the service instead of loading the models, with the same results


def test_lpo_with_reward_url_matches_the_local_lrm(url: str, lrm_dir: Path, tiny_models_dir: Path, tmp_path: Path):
    from safetensors.torch import load_file

    from lpo.reward.lpo import train as lpo_train
    from lpo.reward.lpo.config import LPOConfig

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a blue background\na green square on a white background\n")
    common = dict(family="sd15", base=str(tiny_models_dir / "sd15"), prompts=prompts, epochs=1, sample_batch_size=2,
                  train_batch_size=4, candidates=3, steps=3, threshold=[0.0, 0.0], lora_rank=4, lr=1e-3,
                  device="cpu", validation_images=1)
    local = lpo_train.run(LPOConfig(lrm=lrm_dir, out=tmp_path / "local", **common))
    remote = lpo_train.run(LPOConfig(reward_url=url, out=tmp_path / "remote", **common))
    assert [r["valid_pairs"] for r in remote["history"]] == [r["valid_pairs"] for r in local["history"]]
    assert remote["history"][0]["final_lrm_score"] == pytest.approx(local["history"][0]["final_lrm_score"], abs=1e-4)
    a = load_file(tmp_path / "local" / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "remote" / "lora" / "pytorch_lora_weights.safetensors")
    for key in a:  # the same winners and losers were chosen, so training took the same steps
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_eval_with_reward_url_matches_local_scoring(url: str, tiny_models_dir: Path, tmp_path: Path):
    import polars as pl

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    base = ["eval", "--base", str(tiny_models_dir / "sd15"), "--prompts", str(prompts), "--metrics",
            "pickscore,clip,aesthetic", "--models-dir", str(tiny_models_dir), "--images-per-prompt", "2",
            "--steps", "2", "--device", "cpu"]
    runner = CliRunner()
    local = runner.invoke(app, [*base, "--out", str(tmp_path / "local")])
    assert local.exit_code == 0, local.output
    remote = runner.invoke(app, [*base, "--out", str(tmp_path / "remote"), "--reward-url", url])
    assert remote.exit_code == 0, remote.output
    a = pl.read_parquet(tmp_path / "local" / "images.parquet")
    b = pl.read_parquet(tmp_path / "remote" / "images.parquet")
    for metric in ("pickscore", "clip", "aesthetic"):
        assert b[metric].to_list() == pytest.approx(a[metric].to_list(), rel=1e-5, abs=1e-5)
    summary = json.loads((tmp_path / "remote" / "summary.json").read_text())
    assert "served at" in json.dumps(summary)  # the summary says where each score came from


def test_reward_url_that_does_not_answer_exits_2(tiny_models_dir: Path, tmp_path: Path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    dead = f"http://127.0.0.1:{_free_port()}"
    result = CliRunner().invoke(app, ["optimize", "sd15", "--base", str(tiny_models_dir / "sd15"), "--prompts",
                                      str(prompts), "--out", str(tmp_path / "out"), "--reward-url", dead])
    assert result.exit_code == 2 and "could not reach the reward service" in result.output
    both = CliRunner().invoke(app, ["optimize", "sd15", "--base", str(tiny_models_dir / "sd15"), "--prompts",
                                    str(prompts), "--out", str(tmp_path / "out")])
    assert both.exit_code == 2 and "either --lrm DIR or --reward-url URL" in both.output


def test_flow_matching_timesteps_are_numbers_in_range() -> None:
    """An SD3/FLUX LRM takes sigma x 1000, any number in [0, 1000]; a DDPM one takes integers in [0, 999]."""
    from lpo.reward.serve.protocol import Rejected
    from lpo.reward.serve.requests import decode_latents

    latents = torch.randn(2, 16, 8, 8)
    body = {"latents": _latent_json(latents), "timesteps": [8.9, 1000], "prompts": ["a", "b"]}
    decoded = decode_latents(body, (16, 8, 8), 1000, 16, continuous=True)
    assert decoded.timesteps.dtype == torch.float32 and decoded.timesteps.tolist() == pytest.approx([8.9, 1000.0])
    with pytest.raises(Rejected, match=r"go outside \[0, 1000\]"):
        decode_latents({**body, "timesteps": [8.9, 1000.5]}, (16, 8, 8), 1000, 16, continuous=True)
    with pytest.raises(Rejected, match="list of integers"):
        decode_latents(body, (16, 8, 8), 1000, 16)


# ---------------------------------------------------------------------------------------------------------------
# a flow-matching (sd3) LRM: its sigma timesteps, and VeRL-Omni's latent-reward protocol v1


@pytest.fixture(scope="module")
def sd3_lrm(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from lpo.reward.lrm.model import LatentRewardModel, export_components

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("lrm-sd3")
    model = LatentRewardModel.from_base(str(tiny_models_dir / "sd3"), vfe_scale=7.5).eval()
    model.save_pretrained(out)
    export_components(out, str(tiny_models_dir / "sd3"))
    return out, model


@pytest.fixture(scope="module")
def sd3_url(start_server, sd3_lrm) -> str:
    return start_server("--lrm", sd3_lrm[0], "--batch-timeout-ms", "100")


@pytest.mark.slow  # several processes (or a server) started: in the full run, not the quick loop
def test_an_sd3_lrm_is_served_at_its_sigma_timesteps(sd3_url: str, sd3_lrm) -> None:
    model = sd3_lrm[1]
    client = RewardClient(sd3_url, retries=1, backoff=0.1)
    info = {m["name"]: m for m in client.models()["models"]}["lrm"]
    assert info["family"] == "sd3" and info["timesteps"] == [0.0, 1000.0] and info["latent_shape"] == [16, 8, 8]
    latents = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    timesteps = torch.tensor([8.9, 520.1, 1000.0])
    prompts = ["a red circle", "two blue squares", "a cat"]
    with torch.no_grad():
        expected = model.score(latents, timesteps, prompts)
    torch.testing.assert_close(client.score_latents(latents, timesteps, prompts), expected, rtol=RTOL, atol=ATOL)


def _drm_post(url: str, tensors: dict, version: str | None = "1",
              content_type: str = "application/octet-stream") -> tuple[int, dict]:
    """A protocol-v1 client written from the protocol: a safetensors body, the version header, one JSON answer."""
    return _post(url + "/drm/v1/score", save(tensors), content_type,
                 headers={} if version is None else {"x-drm-protocol-version": version})


def _rollout(tiny_models_dir: Path, prompt: str, seed: int = 3) -> dict:
    """What a VeRL-Omni SD3 rollout sends: a clean latent (bf16) and the pipeline's own encoding of its prompt."""
    from diffusers import StableDiffusion3Pipeline

    pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_models_dir / "sd3")
    with torch.no_grad():
        context, _, pooled, _ = pipeline.encode_prompt(prompt, prompt_2=None, prompt_3=None,
                                                       do_classifier_free_guidance=False)  # max_sequence_length 256
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(seed))
    return {"latents": latents.to(torch.bfloat16), "prompt_embeds": context, "pooled_prompt_embeds": pooled}


@pytest.mark.slow  # several processes (or a server) started: in the full run, not the quick loop
def test_protocol_v1_scores_equal_the_in_process_lrm_on_the_latent_noised_with_the_seed(
        sd3_url: str, sd3_lrm, tiny_models_dir: Path) -> None:
    """The served raw score is the LRM's score of the clean latent noised to sigma = u with torch.randn seeded by
    `seeds`, the prompt read from the sent embeddings; here the in-process side encodes the prompt text itself."""
    model = sd3_lrm[1]
    prompt = "two blue squares"
    rollout = _rollout(tiny_models_dir, prompt)
    clean = rollout["latents"].float()
    for u, seed in ((0.4, 0), (0.0, 7), (1.0, 123456789)):
        status, answer = _drm_post(sd3_url, {**rollout, "u": torch.tensor([u]),
                                             "seeds": torch.tensor([seed], dtype=torch.int64)})
        assert status == 200, answer
        assert answer["protocol_version"] == "1" and len(answer["raw_scores"]) == 1
        noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))
        noisy = (1 - u) * clean + u * noise
        with torch.no_grad():
            expected = model.score(noisy, torch.tensor([u * 1000]), [prompt])
        assert answer["raw_scores"][0] == pytest.approx(float(expected), rel=1e-4, abs=1e-4)
    # embeddings sent in bf16 (a bf16 rollout) are read as sent: the score moves by their rounding only
    half = {**rollout, "prompt_embeds": rollout["prompt_embeds"].to(torch.bfloat16),
            "pooled_prompt_embeds": rollout["pooled_prompt_embeds"].to(torch.bfloat16)}
    status, answer = _drm_post(sd3_url, {**half, "u": torch.tensor([1.0]),
                                         "seeds": torch.tensor([123456789], dtype=torch.int64)})
    assert status == 200 and answer["raw_scores"][0] == pytest.approx(float(expected), rel=1e-2)
    # no seed: the server draws one and says which; the same seed sent again gives the same score
    status, drawn = _drm_post(sd3_url, {**rollout, "u": torch.tensor([0.4])})
    assert status == 200 and isinstance(drawn["seeds"][0], int)
    _, again = _drm_post(sd3_url, {**rollout, "u": torch.tensor([0.4]),
                                   "seeds": torch.tensor(drawn["seeds"], dtype=torch.int64)})
    assert again["raw_scores"] == pytest.approx(drawn["raw_scores"], rel=1e-5, abs=1e-5)
    info = {m["name"]: m for m in RewardClient(sd3_url).models()["models"]}["drm"]
    assert info["protocol_version"] == "1" and info["prompt_embeds"] == list(rollout["prompt_embeds"].shape[1:])
    assert info["pooled_prompt_embeds"] == list(rollout["pooled_prompt_embeds"].shape[1:])


def _drm_refusals(info: dict) -> list:
    """(tensors, version header, status, words of the answer) for a server whose GET /models entry is `info`."""
    (length, width), (pooled,) = info["prompt_embeds"], info["pooled_prompt_embeds"]
    good = {"latents": torch.zeros(1, *info["latent_shape"]), "prompt_embeds": torch.zeros(1, length, width),
            "pooled_prompt_embeds": torch.zeros(1, pooled), "u": torch.tensor([0.5])}
    return [
        ({**good, "u": torch.tensor([1.5])}, "1", 422, "outside [0, 1]"),
        ({**good, "u": torch.tensor([-0.1])}, "1", 422, "outside [0, 1]"),
        ({**good, "u": torch.tensor([float("nan")])}, "1", 422, "u holds NaN"),
        ({**good, "latents": torch.full((1, 16, 8, 8), float("nan"))}, "1", 422, "latents holds NaN"),
        ({**good, "latents": torch.zeros(2, 16, 8, 8)}, "1", 422, "batch size 2"),
        ({**good, "latents": torch.zeros(16, 8, 8)}, "1", 422, "rank 3"),
        ({**good, "latents": torch.zeros(1, 4, 8, 8)}, "1", 422, "this model takes [1, 16, 8, 8]"),
        ({**good, "prompt_embeds": torch.zeros(1, length, width + 1)}, "1", 422, "prompt_embeds have shape"),
        ({**good, "prompt_embeds": torch.zeros(1, length - 1, width)}, "1", 422, "prompt_embeds have shape"),
        ({**good, "pooled_prompt_embeds": torch.zeros(1, pooled - 1)}, "1", 422, "pooled_prompt_embeds have shape"),
        ({k: v for k, v in good.items() if k != "u"}, "1", 422, "missing: u"),
        ({**good, "extra": torch.zeros(1)}, "1", 422, "unknown: extra"),
        ({**good, "seeds": torch.tensor([1.0])}, "1", 422, "seeds is float32"),
        ({**good, "latents": torch.zeros(1, 16, 8, 8, dtype=torch.float64)}, "1", 422, "latents is float64"),
        (good, "2", 400, "version '2'"),
        (good, None, 400, "no x-drm-protocol-version header"),
    ]


@pytest.mark.slow  # several processes (or a server) started: in the full run, not the quick loop
def test_protocol_v1_refusals_name_the_problem_and_the_server_keeps_serving(sd3_url: str, sd3_lrm,
                                                                            tiny_models_dir: Path) -> None:
    info = {m["name"]: m for m in RewardClient(sd3_url).models()["models"]}["drm"]
    for tensors, version, status, needle in _drm_refusals(info):
        got, answer = _drm_post(sd3_url, tensors, version)
        assert (got, needle in answer["detail"]) == (status, True), (needle, answer)
    got, answer = _drm_post(sd3_url, _drm_refusals(info)[0][0], content_type="application/json")
    assert got == 415 and "safetensors" in answer["detail"]
    rollout = _rollout(tiny_models_dir, "a cat")
    status, answer = _drm_post(sd3_url, {**rollout, "u": torch.tensor([0.4])})
    assert status == 200 and math.isfinite(answer["raw_scores"][0])


def test_a_unet_lrm_server_refuses_protocol_v1_with_the_reason(url: str) -> None:
    got, answer = _drm_post(url, {"latents": torch.zeros(1, 4, 8, 8), "u": torch.tensor([0.5])})
    assert got == 404 and "sd15 LRM" in answer["detail"] and "flow-matching" in answer["detail"]



def test_protocol_v1_reads_a_flux_rollout_as_the_in_process_lrm_scores_it(tiny_models_dir: Path,
                                                                           tmp_path: Path) -> None:
    """The route's worker, in process, on a FLUX LRM: the pipeline's T5 sequence and pooled CLIP vector as a rollout
    sends them give the score the LRM gives reading the prompt itself, on the latent noised with the seed."""
    from diffusers import FluxPipeline

    from lpo.reward.lrm.model import LatentRewardModel, export_components
    from lpo.reward.serve.apis import DRMScoreAPI

    torch.manual_seed(0)
    model = LatentRewardModel.from_base(str(tiny_models_dir / "flux"), vfe_scale=7.5,
                                       text_projection_init=None).eval()
    model.save_pretrained(tmp_path)
    export_components(tmp_path, str(tiny_models_dir / "flux"))
    api = DRMScoreAPI(lrm=str(tmp_path), latent_shape=tuple(model.config.latent_shape), num_timesteps=1000,
                      registry={}, stats={}, max_batch_size=4, batch_timeout=0.01, dtype="float32", max_items=4,
                      log_level=logging.WARNING)
    api.setup("cpu")
    prompt = "a red circle"
    with torch.no_grad():
        context, pooled, _ = FluxPipeline.from_pretrained(tiny_models_dir / "flux").encode_prompt(prompt, None)
    latents = torch.randn(1, *model.config.latent_shape, generator=torch.Generator().manual_seed(1))
    body = {"latents": latents, "prompt_embeds": context, "pooled_prompt_embeds": pooled,
            "u": torch.tensor([0.6]), "seeds": torch.tensor([11], dtype=torch.int64)}
    answer = api.predict([api.decode_request({"safetensors": _b64(save(body))})])[0]
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        expected = model.score(0.4 * latents + 0.6 * noise, torch.tensor([600.0]), [prompt])
    assert answer["raw_scores"][0] == pytest.approx(float(expected), rel=1e-5, abs=1e-5)
    entry = api.registry[next(iter(api.registry))]
    assert entry["family"] == "flux" and entry["prompt_embeds"] == list(context.shape[1:])
    wrong = api.decode_request({"safetensors": _b64(save({**body, "prompt_embeds": context[:, :-1]}))})
    assert wrong.status == 422 and "prompt_embeds have shape" in wrong.detail
