"""The line-side endpoint as a station runs it: a real `vitops endpoint` process serving tiny releases registered in
a real `mlflow server`, asked by a real HTTP client (and, for the swap, by a client loop in a process of its own).

One endpoint serves the whole module. It reads the registry every hour only, so every alias move here reaches it
through a webhook signed the way MLflow signs them: the webhook route is tested by every move.
"""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers.registry import CLASSES, build_release, register, unique
from helpers.servers import forget_tracking_uri, free_port, start_server, stop_server
from mlflow import MlflowClient
from PIL import Image

pytestmark = pytest.mark.integration

TOKEN, SECRET = "test-token-123", "test-webhook-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def registry(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Version 1 (champion) and version 2 of a fresh model, each a tiny ViT with an ONNX Runtime engine."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        forget_tracking_uri(mp)
        root = tmp_path_factory.mktemp("endpoint-releases")
        name = unique("endpoint")
        first, second = build_release(root / "r1", seed=0), build_release(root / "r2", seed=1)
        versions = {"v1": register(name, first), "v2": register(name, second)}
        MlflowClient().set_registered_model_alias(name, "champion", versions["v1"])
        yield {"name": name, "root": root, "url": mlflow_server, "first": first, **versions}


@pytest.fixture(scope="module")
def endpoint(registry: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`vitops endpoint NAME` with a token, the webhook on, small limits; yields its URL."""
    import os

    work = tmp_path_factory.mktemp("endpoint")
    (work / "params.yaml").write_text(
        "endpoint:\n  poll_s: 3600\n  max_batch_size: 4\n  max_pixels: 40000\n  max_body_mb: 0.25\n"
        f"  max_batch_images: 4\n  cache_dir: {work / 'cache'}\n  token_env: VITOPS_TEST_TOKEN\n"
        "  webhook_secret_env: VITOPS_TEST_SECRET\n  warmup_iters: 1\n"
        f"prediction_log:\n  dir: {work / 'log'}\n"
    )
    port = free_port()
    env = os.environ | {"MLFLOW_TRACKING_URI": registry["url"], "VITOPS_TEST_TOKEN": TOKEN,
                        "VITOPS_TEST_SECRET": SECRET}  # fmt: skip
    cmd = [sys.executable, "-m", "vitops", "--params", str(work / "params.yaml"), "endpoint", registry["name"],
           "--port", str(port)]  # fmt: skip
    server = start_server(cmd, f"http://127.0.0.1:{port}/v2/health/ready", work / "endpoint.log", env=env)
    yield f"http://127.0.0.1:{port}"
    stop_server(server)
    log = (work / "endpoint.log").read_text()
    assert "vitops endpoint: stopped" in log, log[-3000:]
    assert "Traceback" not in log and "Already not alive" not in log, log[-3000:]  # a stop is quiet


@pytest.fixture()
def client(endpoint: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=endpoint, headers=AUTH, timeout=60) as c:
        yield c


def png(seed: int, size: tuple[int, int] = (40, 30), fmt: str = "PNG") -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def move(client: httpx.Client, registry: dict, version: str, signature: str | None = None) -> httpx.Response:
    """Point champion at `version` and deliver the webhook MLflow would send (signed with MLflow's own code)."""
    from mlflow.webhooks.delivery import _generate_hmac_signature

    MlflowClient(registry["url"]).set_registered_model_alias(registry["name"], "champion", version)
    body = json.dumps({"entity": "model_version_alias", "action": "created", "timestamp": "2026-12-04T00:00:00Z",
                       "data": {"name": registry["name"], "alias": "champion", "version": version}})  # fmt: skip
    delivery, stamp = str(uuid.uuid4()), str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "X-MLflow-Delivery-Id": delivery,
        "X-MLflow-Timestamp": stamp,
        "X-MLflow-Signature": signature or _generate_hmac_signature(SECRET, delivery, stamp, body),
    }
    return httpx.post(f"{client.base_url}/v2/webhooks/mlflow", content=body, headers=headers)  # no bearer token


def wait_for(client: httpx.Client, name: str, condition, timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        meta = client.get(f"/v2/models/{name}").json()
        if condition(meta):
            return meta
        assert time.monotonic() < deadline, f"endpoint never got there: {meta}"
        time.sleep(0.3)


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"{name}(\{{[^}}]*\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_answers_equal_pyfunc_predict(client: httpx.Client, registry: dict, tmp_path: Path) -> None:
    from vitops.flows.registry import load_pyfunc

    paths = []
    for i, (size, fmt) in enumerate([((40, 30), "PNG"), ((32, 32), "PNG"), ((64, 20), "JPEG"), ((50, 90), "JPEG")]):
        paths.append(tmp_path / f"img{i}.{fmt.lower()}")
        paths[-1].write_bytes(png(i, size, fmt))
    model = load_pyfunc(registry["name"], registry["v1"])
    expected = model.predict(None, np.array([str(p) for p in paths], dtype=object))
    probs = expected[[f"prob_{c}" for c in CLASSES]].to_numpy()

    for i, path in enumerate(paths):  # /predict, raw body and multipart
        kind = "image/png" if path.suffix == ".png" else "image/jpeg"
        raw = client.post("/predict", content=path.read_bytes(), headers={"Content-Type": kind}).json()
        form = client.post("/predict", files={"image": (path.name, path.read_bytes(), kind)}).json()
        for answer in (raw, form):
            assert answer["version"] == registry["v1"] and answer["engine"] == "onnxruntime-fp32"
            assert answer["label"] == expected["label"][i]
            np.testing.assert_allclose([answer["probabilities"][c] for c in CLASSES], probs[i], atol=1e-6)

    data = [base64.b64encode(p.read_bytes()).decode() for p in paths]
    body = {"id": "batch-1", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [4], "data": data}]}
    out = client.post(f"/v2/models/{registry['name']}/infer", json=body).json()
    assert out["id"] == "batch-1" and out["model_version"] == registry["v1"]
    tensors = {o["name"]: o for o in out["outputs"]}
    assert tensors["label"]["data"] == list(expected["label"])
    np.testing.assert_allclose(np.reshape(tensors["probabilities"]["data"], (4, 3)), probs, atol=1e-6)

    pixels = np.random.default_rng(9).integers(0, 256, (2, 24, 36, 3), dtype=np.uint8)
    body = {
        "inputs": [{"name": "image", "datatype": "UINT8", "shape": [2, 24, 36, 3], "data": pixels.ravel().tolist()}]
    }
    out = client.post(f"/v2/models/{registry['name']}/infer", json=body).json()
    expected = model.predict(None, pixels)
    assert out["outputs"][0]["data"] == list(expected["label"])
    np.testing.assert_allclose(out["outputs"][1]["data"], expected["confidence"], atol=1e-6)


def test_metadata_health_and_unknown_models(client: httpx.Client, registry: dict, endpoint: str) -> None:
    meta = client.get(f"/v2/models/{registry['name']}").json()
    assert meta["name"] == registry["name"] and meta["classes"] == CLASSES
    assert meta["engine"] == "onnxruntime-fp32" and meta["input_shape"] == [-1, -1, -1, 3]
    assert meta["model_input_shape"] == [-1, 3, 32, 32] and meta["alias"] == "champion"
    assert [w["version"] for w in meta["workers"]] == [meta["version"]]
    assert httpx.get(f"{endpoint}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{endpoint}/v2/health/ready").json() == {"ready": True}
    assert client.get(f"/v2/models/{registry['name']}/ready").status_code == 200
    assert client.get("/v2").json()["name"] == "vitops"
    missing = client.get("/v2/models/another-model")
    assert missing.status_code == 404 and "another-model" in missing.json()["error"]
    other = client.get(f"/v2/models/{registry['name']}/versions/999")
    assert other.status_code == 404 and "not served" in other.json()["error"]


def test_the_docs_replay_client_replays_a_folder_and_writes_verdicts(endpoint: str, registry: dict,
                                                                      tmp_path: Path) -> None:  # fmt: skip
    """docs/examples/replay_line.py, which the live-pilot walkthrough runs: one answer per image, verdicts of the
    labelled ones under their folder's label, keyed by the sha256 the endpoint answered with."""
    import csv
    import hashlib

    batch = tmp_path / "batch"
    files = {batch / "bolt" / "a.png": 1, batch / "nut" / "b.png": 2, batch / "unlabelled" / "c.png": 3,
             batch / "d.png": 4}  # fmt: skip
    for path, seed in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png(seed))
    script = Path(__file__).resolve().parents[1] / "docs" / "examples" / "replay_line.py"
    verdicts = tmp_path / "verdicts.csv"
    cmd = [sys.executable, str(script), str(batch), "--url", endpoint, "--verdicts", str(verdicts), "--operator", "kim"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={"VITOPS_ENDPOINT_TOKEN": TOKEN,
                         "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f"4 answers  route champion  version {registry['v1']}" in out.stdout, out.stdout
    with verdicts.open(encoding="utf-8") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["label"])
    expected = [(hashlib.sha256(p.read_bytes()).hexdigest(), p.parent.name) for p in files if files[p] in (1, 2)]
    assert [(r["sha256"], r["label"], r["operator"]) for r in rows] == [(h, label, "kim") for h, label in expected]
    unauthorised = subprocess.run(cmd[:-4], capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert (
        unauthorised.returncode == 1
        and "401" in unauthorised.stderr
        and "4 of 4 requests refused" in unauthorised.stderr
    )


def test_bad_inputs_get_4xx_and_the_service_stays_up(client: httpx.Client, registry: dict) -> None:
    infer = f"/v2/models/{registry['name']}/infer"
    good = png(1)
    sixteen = io.BytesIO()
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(sixteen, format="PNG")
    cases = [
        ("not an image", client.post("/predict", content=b"plain text", headers={"Content-Type": "image/png"}),
         400, "not an image"),
        ("truncated", client.post("/predict", content=good[: len(good) // 2], headers={"Content-Type": "image/png"}),
         400, "truncated"),
        ("16-bit", client.post("/predict", content=sixteen.getvalue(), headers={"Content-Type": "image/png"}),
         400, "mode 'I;16'"),
        ("over max_pixels", client.post("/predict", content=png(2, (250, 250)), headers={"Content-Type": "image/png"}),
         413, "max_pixels"),
        ("bomb", client.post("/predict", content=png_zeros(6000), headers={"Content-Type": "image/png"}),
         413, "6000x6000"),
        ("over max_body_mb", client.post("/predict", content=b"\0" * 300_000, headers={"Content-Type": "image/png"}),
         413, "max_body_mb"),
        ("content type", client.post("/predict", content=good, headers={"Content-Type": "text/plain"}),
         415, "image/png"),
        ("form", client.post(infer, content=b"{}", headers={"Content-Type": "application/x-www-form-urlencoded"}),
         415, "application/json"),
        ("bad json", client.post(infer, content=b"{not json", headers={"Content-Type": "application/json"}),
         400, "not JSON"),
        ("batch", client.post(infer, json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [5],
                                                       "data": [base64.b64encode(good).decode()] * 5}]}),
         413, "max_batch_images"),
        ("two files", client.post("/predict", files={"a": ("a.png", good), "b": ("b.png", good)}),
         400, "exactly one file"),
    ]  # fmt: skip
    for what, response, status, words in cases:
        assert response.status_code == status, (what, response.text)
        assert words in response.json()["error"], (what, response.text)
    assert client.post("/predict", content=good, headers={"Content-Type": "image/png"}).status_code == 200


def png_zeros(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (side, side)).save(buf, format="PNG")
    return buf.getvalue()


def test_auth_guards_everything_but_health(endpoint: str, registry: dict) -> None:
    image = {"content": png(3), "headers": {"Content-Type": "image/png"}}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        for method, path, kw in [("POST", "/predict", image), ("GET", f"/v2/models/{registry['name']}", {}),
                                 ("GET", "/metrics", {})]:  # fmt: skip
            extra = {**kw, "headers": {**kw.get("headers", {}), **headers}}
            r = httpx.request(method, endpoint + path, **extra)
            assert r.status_code == 401 and "bearer token" in r.json()["error"], (path, headers, r.text)
            assert r.headers["WWW-Authenticate"] == "Bearer"
    assert httpx.get(f"{endpoint}/v2/health/ready").status_code == 200
    ok = httpx.post(f"{endpoint}/predict", content=png(3), headers={**AUTH, "Content-Type": "image/png"})
    assert ok.status_code == 200


def test_metrics_count_requests_errors_and_batches(client: httpx.Client, registry: dict) -> None:
    before = client.get("/metrics").text
    version = client.get(f"/v2/models/{registry['name']}").json()["version"]
    labels = {"model": registry["name"], "version": version, "engine": "onnxruntime-fp32"}
    for i in range(5):
        assert client.post("/predict", content=png(i), headers={"Content-Type": "image/png"}).status_code == 200
    assert client.post("/predict", content=b"junk", headers={"Content-Type": "image/png"}).status_code == 400
    after = client.get("/metrics").text
    delta = {n: metric(after, n, **kw) - metric(before, n, **kw) for n, kw in [
        ("vitops_endpoint_requests_total", {**labels, "route": "predict"}),
        ("vitops_endpoint_errors_total", {**labels, "route": "predict", "code": "400"}),
        ("vitops_endpoint_images_total", labels),
        ("vitops_endpoint_batch_images_count", {}),
        ("vitops_endpoint_request_seconds_count", {"route": "predict"}),
    ]}  # fmt: skip
    assert delta == {"vitops_endpoint_requests_total": 6, "vitops_endpoint_errors_total": 1,
                     "vitops_endpoint_images_total": 5, "vitops_endpoint_batch_images_count": 5,
                     "vitops_endpoint_request_seconds_count": 6}  # fmt: skip
    assert metric(after, "vitops_endpoint_version", model=registry["name"]) == int(version)
    assert metric(after, "vitops_endpoint_serving", **labels) == 1


def test_a_version_that_fails_its_checks_is_refused_and_the_old_one_serves_on(
    client: httpx.Client, registry: dict, mlflow_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    forget_tracking_uri(monkeypatch)
    name, served = registry["name"], client.get(f"/v2/models/{registry['name']}").json()["version"]
    # a version whose engine file was replaced after registration: its sha256 no longer matches the record
    tampered = register(name, registry["first"])
    run_id = MlflowClient().get_model_version(name, tampered).run_id
    fake = registry["root"] / "tampered" / "fp32.onnx"
    fake.parent.mkdir(exist_ok=True)
    fake.write_bytes(b"not the engine that was registered")
    MlflowClient().log_artifact(run_id, str(fake), "pyfunc/artifacts/engines/onnxruntime")
    # a version whose metadata names 2 classes for a 3-logit model: it loads, but its input example fails
    broken = build_release(registry["root"] / "broken", seed=2)
    meta = json.loads((broken.model_dir / "model.json").read_text())
    (broken.model_dir / "model.json").write_text(json.dumps(meta | {"classes": CLASSES[:2]}))
    mismatched = register(name, broken)

    for version, check in [(tampered, "sha256"), (mismatched, "input_example")]:
        assert move(client, registry, version).json() == {"accepted": True}
        meta = wait_for(client, registry["name"], lambda m, v=version: (m.get("refused") or {}).get("version") == v)
        assert meta["refused"]["check"] == check and meta["version"] == served, meta
        answer = client.post("/predict", content=png(5), headers={"Content-Type": "image/png"}).json()
        assert answer["version"] == served
        text = client.get("/metrics").text
        assert metric(text, "vitops_endpoint_swap_failures_total", model=name, version=version, check=check) == 1
        assert metric(text, "vitops_endpoint_refused_version", model=name) == int(version)

    # a webhook with a bad signature moves nothing; back to the served version, the refusal is cleared
    bad = move(client, registry, served, signature="v1,bm90IHRoZSBzaWduYXR1cmU=")
    assert bad.status_code == 401 and "signature" in bad.json()["error"]
    assert move(client, registry, served).json() == {"accepted": True}
    wait_for(client, registry["name"], lambda m: m["registry"]["registry_version"] == served)


def test_a_swap_under_load_fails_no_request_and_a_rollback_is_a_move(
    client: httpx.Client, registry: dict, endpoint: str, tmp_path: Path
) -> None:
    start = client.get(f"/v2/models/{registry['name']}").json()["version"]
    image, out, stop = tmp_path / "x.png", tmp_path / "results.jsonl", tmp_path / "stop"
    image.write_bytes(png(7))
    loop = subprocess.Popen([sys.executable, str(Path(__file__).parent / "helpers" / "client_loop.py"), endpoint,
                             TOKEN, str(image), str(out), str(stop), "3"])  # fmt: skip
    try:
        time.sleep(2)
        other = registry["v2"] if start == registry["v1"] else registry["v1"]
        for version in (other, start):  # the move, then the rollback
            assert move(client, registry, version).json() == {"accepted": True}
            wait_for(
                client,
                registry["name"],
                lambda m, v=version: m["version"] == v and all(w["version"] == v for w in m["workers"]),
            )
            time.sleep(2)
    finally:
        stop.touch()
        loop.wait(60)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    failed = [r for r in rows if r["status"] != 200]
    assert not failed, failed[:5]
    for thread in {r["thread"] for r in rows}:  # each client saw start, then other, then start: no flapping
        seen = [r["version"] for r in sorted(rows, key=lambda r: r["t"]) if r["thread"] == thread]
        runs = [v for i, v in enumerate(seen) if i == 0 or v != seen[i - 1]]
        assert runs == [start, other, start], runs
    assert max(r["seconds"] for r in rows) < 10, "a request waited longer than a swap's warm-up"
