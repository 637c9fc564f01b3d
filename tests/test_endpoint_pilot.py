"""The pilot beside the champion on a real `vitops endpoint` (tiny releases in a real `mlflow server`, a real HTTP
client): the shadow, the canary, the prediction log of every answer, operator feedback, the online guardrails that
stop a bad pilot, and a SIGKILL that loses at most the last second of the log.

One endpoint serves the first four tests, in order: the champion is version 1; the pilot, version 2, is the
champion with its classifier's rows rolled, so it names another class than the champion on every image, with the
same confidence. The tests set the pilot's stage tags as the pilot flow does; the endpoint reads the registry every
second. A second endpoint, serving the champion alone, is killed with SIGKILL.
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from helpers.endpoints import kill_endpoint, png, start_endpoint, stop_endpoint
from helpers.registry import CLASSES, build_release, register, unique
from helpers.servers import forget_tracking_uri, free_port
from mlflow import MlflowClient

from vitops.deploy.guardrails import routes_to_candidate
from vitops.deploy.prediction_log import read_events, read_predictions, realized_accuracy

pytestmark = pytest.mark.integration

WINDOW, MIN_SAMPLES, BATCH = 60, 20, 4


def params(work: Path) -> str:
    return f"""\
endpoint:
  poll_s: 1.0
  max_batch_size: {BATCH}
  warmup_iters: 1
  cache_dir: {work / "cache"}
  station: line-7
prediction_log:
  dir: {work / "log"}
  flush_s: 0.5
  keep_images: 0.0
  keep_below_confidence: 0.0
pilot:
  online:
    window: {WINDOW}
    min_samples: {MIN_SAMPLES}
    max_error_rate: 0.05
    max_p95_ms: null
    max_disagreement: 0.5
    max_confidence_drop: null
    max_accuracy_drop_points: null
    check_every_s: 0.5
"""


@pytest.fixture(scope="module")
def registry(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Version 1 (champion) and version 2 (pilot: version 1 with its classes rolled by one)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        forget_tracking_uri(mp)
        root = tmp_path_factory.mktemp("pilot-releases")
        name = unique("pilot")
        v1 = register(name, build_release(root / "r1", seed=0))
        v2 = register(name, build_release(root / "r2", seed=0, head_shift=1))
        client = MlflowClient(mlflow_server)
        client.set_registered_model_alias(name, "champion", v1)
        yield {"name": name, "url": mlflow_server, "v1": v1, "v2": v2, "client": client}


@pytest.fixture(scope="module")
def endpoint(registry: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    work = tmp_path_factory.mktemp("pilot-endpoint")
    port = free_port()
    proc = start_endpoint(work, registry["name"], registry["url"], params(work), port)
    yield {"url": f"http://127.0.0.1:{port}", "log": work / "log", "work": work}
    stop_endpoint(proc)
    text = (work / "endpoint.log").read_text()
    assert "vitops endpoint: stopped" in text and "Traceback" not in text, text[-3000:]


@pytest.fixture()
def client(endpoint: dict) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=endpoint["url"], timeout=60) as c:
        yield c


def stage(registry: dict, stage: str, fraction: float | None = None) -> None:
    """Start a stage of the pilot as the pilot flow does: its tags on version 2, `pilot` on it."""
    client, name, v2 = registry["client"], registry["name"], registry["v2"]
    client.set_model_version_tag(name, v2, "pilot.stage_since", datetime.now(UTC).isoformat())
    if fraction is not None:
        client.set_model_version_tag(name, v2, "pilot.canary_fraction", str(fraction))
    client.set_model_version_tag(name, v2, "pilot.stage", stage)  # last, as records.tag_stage does
    client.set_registered_model_alias(name, "pilot", v2)


def wait_for(what: str, probe, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None and (hasattr(value, "columns") or bool(value)):  # a DataFrame, or a true value
            return value
        assert time.monotonic() < deadline, f"never happened: {what} (last: {value!r})"
        time.sleep(0.3)


def pilot_view(client: httpx.Client, registry: dict) -> dict:
    return client.get(f"/v2/models/{registry['name']}").json()["pilot"]


def predict(client: httpx.Client, data: bytes) -> dict:
    r = client.post("/predict", content=data, headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    return r.json()


def logged(endpoint: dict, request_ids: set[str], **filters: str):
    """The log's records of these requests, once all of them are committed."""

    def probe():
        frame = read_predictions(endpoint["log"], **filters)
        frame = frame[frame["request_id"].isin(request_ids)]
        return frame if set(frame["request_id"]) == request_ids else None

    return wait_for(f"{len(request_ids)} requests logged with {filters}", probe, 60)


def test_shadow_only_the_champion_answers_and_both_are_logged(client, registry, endpoint) -> None:
    stage(registry, "shadow")
    view = wait_for("the shadow holds version 2", lambda: (v := pilot_view(client, registry))["shadow"]["version"]
                    == registry["v2"] and v)  # fmt: skip
    assert view["stage"] == "shadow" and view["version"] == registry["v2"] and view["workers"] == [None]

    answers = [predict(client, png(seed)) for seed in range(8)]
    pixels = [base64.b64encode(png(100 + i)).decode() for i in range(2)]
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": pixels}]}
    oip = client.post(f"/v2/models/{registry['name']}/infer", json=body).json()
    assert {a["route"] for a in answers} == {"champion"} and {a["version"] for a in answers} == {registry["v1"]}
    assert oip["model_version"] == registry["v1"] and oip["parameters"]["route"] == ["champion", "champion"]
    assert oip["parameters"]["sha256"][0] == hashlib.sha256(base64.b64decode(pixels[0])).hexdigest()
    assert answers[0]["sha256"] == hashlib.sha256(png(0)).hexdigest()

    labels = dict(zip(oip["parameters"]["request_id"], oip["outputs"][0]["data"], strict=True))
    labels |= {a["request_id"]: a["label"] for a in answers}
    champion = logged(endpoint, set(labels), route="champion")
    shadow = logged(endpoint, set(labels), route="shadow")
    assert set(champion["version"]) == {registry["v1"]} and set(champion["station"]) == {"line-7"}
    assert champion.set_index("request_id")["label"].to_dict() == labels
    assert set(shadow["version"]) == {registry["v2"]} and set(shadow["status"]) == {"ok"}
    by_request = shadow.set_index("request_id")
    assert by_request["champion_label"].to_dict() == labels
    assert (by_request["label"] != by_request["champion_label"]).all()  # the rolled pilot disagrees everywhere
    for kept in by_request["image"]:  # every disagreement's image is kept
        assert kept and (endpoint["log"] / kept).is_file()


def test_canary_routes_by_content_hash(client, registry, endpoint) -> None:
    stage(registry, "canary", fraction=0.5)
    wait_for("the workers hold the canary", lambda: (v := pilot_view(client, registry))["stage"] == "canary"
             and v["fraction"] == 0.5 and v["workers"] == [registry["v2"]])  # fmt: skip
    images = [png(1000 + i) for i in range(30)]
    first = [predict(client, data) for data in images]
    again = [predict(client, data) for data in images]
    expected = [routes_to_candidate(hashlib.sha256(data).hexdigest(), 0.5) for data in images]
    assert [a["route"] for a in first] == ["canary" if e else "champion" for e in expected]
    assert [a["route"] for a in again] == [a["route"] for a in first]  # a retried image goes the same way
    assert 0 < sum(expected) < len(images)
    for answer in first + again:
        assert answer["version"] == (registry["v2"] if answer["route"] == "canary" else registry["v1"])

    data = [base64.b64encode(d).decode() for d in images[:6]]
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [6], "data": data}]}
    out = client.post(f"/v2/models/{registry['name']}/infer", json=body).json()
    assert out["parameters"]["route"] == [a["route"] for a in first[:6]]

    canary = logged(endpoint, {a["request_id"] for a in first if a["route"] == "canary"}, route="canary")
    assert set(canary["version"]) == {registry["v2"]} and set(canary["status"]) == {"ok"}


def test_feedback_joins_the_log(client, registry, endpoint) -> None:
    answers = [predict(client, png(2000 + i)) for i in range(12)]  # still the canary of the test before
    truth = [{"sha256": a["sha256"], "label": a["label"] if a["route"] == "champion" else
              CLASSES[(CLASSES.index(a["label"]) - 1) % 3], "operator": "ana"} for a in answers]  # fmt: skip
    assert client.post("/feedback", json=truth).json() == {"accepted": 12}
    single = {"sha256": answers[0]["sha256"].upper(), "label": truth[0]["label"], "operator": "ben"}
    assert client.post("/feedback", json=single).json() == {"accepted": 1}
    for bad, words in [
        ({"sha256": "abc", "label": "nut", "operator": "ana"}, "64 hex"),
        ({"sha256": answers[0]["sha256"], "label": "screw", "operator": "ana"}, "served classes"),
        ({"sha256": answers[0]["sha256"], "label": "nut"}, "operator"),
        ([], "empty"),
    ]:
        r = client.post("/feedback", json=bad)
        assert r.status_code == 400 and words in r.json()["error"], r.text
    assert client.post("/feedback", content=b"{", headers={"Content-Type": "application/json"}).status_code == 400

    rows = {(r.version, r.route): r for r in realized_accuracy(endpoint["log"], model=registry["name"])}
    canary = sum(a["route"] == "canary" for a in answers)
    champion, pilot = rows[(registry["v1"], "champion")], rows[(registry["v2"], "canary")]
    assert (champion.labelled, champion.accuracy.correct) == (len(answers) - canary, len(answers) - canary)
    assert (pilot.labelled, pilot.accuracy.correct) == (canary, 0)  # the rolled pilot is wrong on every image


def test_a_guardrail_breach_removes_pilot_and_stops_routing(client, registry, endpoint) -> None:
    name, v1, v2 = registry["name"], registry["v1"], registry["v2"]
    stage(registry, "shadow")
    since = time.time()
    wait_for("the shadow holds version 2 again", lambda: (v := pilot_view(client, registry))["stage"] == "shadow"
             and v["shadow"]["version"] == v2)  # fmt: skip

    seed = 3000
    while "pilot" in registry["client"].get_registered_model(name).aliases:
        assert seed < 3000 + 20 * WINDOW, "the pilot disagreeing on every image was never stopped"
        assert predict(client, png(seed))["version"] == v1
        seed += 1
        time.sleep(0.1)

    model = registry["client"].get_registered_model(name)
    assert model.aliases == {"champion": v1}  # the champion is never touched
    tags = registry["client"].get_model_version(name, v2).tags
    assert tags["pilot.stage"] == "stopped" and "disagreement" in tags["pilot.online.breach"]
    assert "pilot.online.max_disagreement" in tags["pilot.online.breach"] and tags["pilot.online.breach_time"]
    from vitops.flows.aliases import history

    move = history(name, "pilot")[-1]
    assert move.from_version == v2 and move.to_version is None and "disagreement" in move.reason

    view = wait_for("the breach shown", lambda: (v := pilot_view(client, registry))["breach"] and v)
    assert view["version"] is None and view["breach"]["version"] == v2 and view["breach"]["moved"] is True
    events = wait_for("the breach logged", lambda: len(e := read_events(endpoint["log"], kind="breach")) and e)
    breach_time = float(events["time"].iloc[-1])
    assert events["detail"].iloc[-1]["version"] == v2

    after = {predict(client, png(seed + 1 + i))["request_id"] for i in range(10)}
    logged(endpoint, after, route="champion")
    time.sleep(2 * 0.5 + 1)  # two commits of the log, and the shadow's dequeue
    shadow = read_predictions(endpoint["log"], since, model=name, version=v2, route="shadow")
    assert len(shadow) >= MIN_SAMPLES and not shadow["request_id"].isin(after).any()
    assert (shadow["time"] > breach_time).sum() <= BATCH  # at most the batch in the shadow's hands at the breach
    labels = (f'model="{name}"', f'version="{v2}"', 'check="disagreement"')
    lines = client.get("/metrics").text.splitlines()
    breaches = [x for x in lines if x.startswith("vitops_endpoint_guardrail_breaches") and all(k in x for k in labels)]
    assert len(breaches) == 1 and breaches[0].endswith(" 1.0"), breaches


def test_sigkill_loses_at_most_the_last_second(registry, tmp_path: Path) -> None:
    port = free_port()
    proc = start_endpoint(tmp_path, registry["name"], registry["url"], params(tmp_path), port)
    answered: list[tuple[str, float]] = []
    stop = threading.Event()

    def loop() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            n = 0
            while not stop.is_set():
                try:
                    answer = predict(http, png(5000 + n))
                except httpx.HTTPError:
                    return  # the endpoint is gone
                answered.append((answer["request_id"], time.time()))
                n += 1

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        wait_for("three seconds of answers", lambda: answered and answered[-1][1] - answered[0][1] > 3, 60)
    finally:
        killed = kill_endpoint(proc)
        stop.set()
        thread.join(30)
        proc.log.close()  # type: ignore[attr-defined]
    log = read_predictions(tmp_path / "log", model=registry["name"])
    kept = set(log["request_id"])
    lost = [(rid, killed - t) for rid, t in answered if rid not in kept]
    assert len(answered) > len(lost)
    assert all(age <= 1.0 for _, age in lost), f"answers older than 1 s lost: {[a for a in lost if a[1] > 1.0]}"
