"""Authenticated servers: an MLflow server with the basic-auth app (users, permissions on registered models) and a
Prefect server with its auth string. A wrong password or auth string is one clear message and exit 2; a user
without MANAGE cannot approve or move champion; the approver is the authenticated MLflow user, checked again by
the promote step, with the four-eyes rule; a tampered engine is refused; the history names the identities."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.registry import build_release, register, unique
from helpers.servers import forget_tracking_uri

from vitops.flows import aliases, registry
from vitops.flows.pilot_batch import PilotError, Versions
from vitops.flows.promotion import ATTESTED_BY, ATTESTED_RUN, promote_approved, record_approval

pytestmark = pytest.mark.integration
USERS = {"trainer": "trainer-password", "alice": "alice-password", "viewer": "viewer-password"}

PAUSED_FLOW = """
import sys
from prefect import flow
from prefect.flow_runs import pause_flow_run
from vitops.flows.pilot import Approval

@flow(name="pilot")
def pilot(model_name: str, version: str) -> None:
    answer = pause_flow_run(wait_for_input=Approval.with_initial_data(description="test"), timeout=300, poll_interval=1)
    print("ANSWER", answer.approver, answer.approve, flush=True)

pilot(model_name=sys.argv[1], version=sys.argv[2])
"""


@pytest.fixture(scope="module")
def site(auth_mlflow_server: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The users, and a model whose version 1 `trainer` registered, on which `alice` holds MANAGE."""
    from mlflow.server import get_app_client

    url = auth_mlflow_server["url"]
    saved = {
        k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    }
    _as("admin", auth_mlflow_server["password"], url)
    admin = get_app_client("basic-auth", tracking_uri=url)
    for user, password in USERS.items():
        admin.create_user(user, password)
    admin.update_user_admin("trainer", True)  # trains and registers: may create models
    release = build_release(tmp_path_factory.mktemp("auth-release"), seed=9)
    name = unique("auth")
    _as("trainer", USERS["trainer"], url)
    version = register(name, release)
    _as("admin", auth_mlflow_server["password"], url)
    admin.grant_user_permission("alice", "registered_model", name, "MANAGE")
    yield {"url": url, "name": name, "version": version, "release": release, "admin": admin,
           "admin_password": auth_mlflow_server["password"], "artifacts": auth_mlflow_server["artifacts"]}  # fmt: skip
    for key, value in saved.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def _as(user: str, password: str, url: str) -> None:
    """This process talks to `url` as `user` (MLflow reads the credentials from the environment per request)."""
    os.environ.update(MLFLOW_TRACKING_URI=url, MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)


def _env(site: dict[str, Any], user: str | None, password: str | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "MLFLOW_HTTP_REQUEST"))}
    env |= {"MLFLOW_TRACKING_URI": site["url"], **extra}
    if user:
        env |= {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password or USERS.get(user, "")}
    return env


def _vitops(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vitops", *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture()
def as_admin(site: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    forget_tracking_uri(monkeypatch)
    _as("admin", site["admin_password"], site["url"])


def test_a_wrong_or_missing_password_is_one_message_and_exit_2(site: dict[str, Any]) -> None:
    wrong = _vitops(_env(site, "alice", "not-her-password"), "history", site["name"])
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr, wrong.stderr
    assert "refused the request as 'alice' (HTTP 401" in wrong.stderr and "MLFLOW_TRACKING_PASSWORD" in wrong.stderr
    missing = _vitops(_env(site, None), "lineage", f"{site['name']}/1")
    assert missing.returncode == 2 and "without credentials" in missing.stderr and "Traceback" not in missing.stderr


def test_a_user_without_manage_cannot_move_champion_outside_a_pilot(site: dict[str, Any], as_admin: None) -> None:
    name, version = site["name"], site["version"]
    args = ("promote", name, "--version", version, "--expect", "none", "--override-pilot", "--reason", "hotfix")
    refused = _vitops(_env(site, "viewer"), *args)
    assert refused.returncode == 2, refused.stderr
    assert f"viewer may not move champion outside a pilot of {name}: that needs MANAGE" in refused.stderr
    assert "holds READ" in refused.stderr
    assert "champion" not in registry.current_aliases(name)
    history = _vitops(_env(site, "viewer"), "history", name, "--json")  # READ is enough to read it
    assert history.returncode == 0 and all(json.loads(line)["alias"] != "champion" for line in history.stdout.split())


def _prefect_env(site: dict[str, Any], prefect: dict[str, str], user: str, auth: str | None = None) -> dict[str, str]:
    return _env(site, user, PREFECT_API_URL=prefect["api"], PREFECT_API_AUTH_STRING=auth or prefect["auth"])


def _paused(prefect: dict[str, str], proc: subprocess.Popen, name: str) -> str:
    auth = "Basic " + base64.b64encode(prefect["auth"].encode()).decode()
    body = json.dumps({"flow_runs": {"state": {"type": {"any_": ["PAUSED"]}}}, "limit": 50}).encode()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        request = urllib.request.Request(f"{prefect['api']}/flow_runs/filter", data=body, headers={
            "Content-Type": "application/json", "Authorization": auth})  # fmt: skip
        with urllib.request.urlopen(request, timeout=10) as resp:
            for run in json.loads(resp.read()):
                if run["parameters"].get("model_name") == name:
                    return run["id"]
        assert proc.poll() is None, proc.stdout.read()  # type: ignore[union-attr]
        time.sleep(1)
    raise AssertionError("the flow never paused")


def test_the_approver_is_the_authenticated_user_with_manage(
    site: dict[str, Any], auth_prefect_server: dict[str, str], as_admin: None, tmp_path: Path
) -> None:
    name, version = site["name"], site["version"]
    env = _prefect_env(site, auth_prefect_server, "admin") | {"MLFLOW_TRACKING_PASSWORD": site["admin_password"]}
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_FLOW, name, version], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        run_id = _paused(auth_prefect_server, proc, name)
        bad_auth = _vitops(_prefect_env(site, auth_prefect_server, "alice", auth="vitops:wrong"), "approve", run_id)
        assert bad_auth.returncode == 2 and "refused the PREFECT_API_AUTH_STRING given" in bad_auth.stderr
        viewer = _vitops(_prefect_env(site, auth_prefect_server, "viewer"), "approve", run_id)
        assert viewer.returncode == 2 and f"viewer may not approve a promotion of {name}" in viewer.stderr
        other = _vitops(_prefect_env(site, auth_prefect_server, "alice"), "approve", run_id, "--approver", "mallory")
        assert other.returncode == 2 and "authenticated you as alice" in other.stderr
        ok = _vitops(_prefect_env(site, auth_prefect_server, "alice"), "approve", run_id, "--comment", "clean")
        assert ok.returncode == 0, ok.stderr
        assert "as alice (alice (MLflow user))" in ok.stdout
        assert proc.wait(timeout=120) == 0
        assert "ANSWER alice True" in proc.stdout.read()  # type: ignore[union-attr]
    finally:
        proc.kill()
    tags = registry.version_info(name, version).tags
    assert tags[ATTESTED_BY] == "alice" and tags[ATTESTED_RUN] == run_id

    # the promote step, run by the admin (the pilot's service account), checks alice again before it moves
    versions = Versions(name, version, None, None, tags)
    record_approval(versions, "approved", "alice", "clean", run_id)
    site["admin"].revoke_user_permission("alice", "registered_model", name)
    with pytest.raises(PilotError, match="alice no longer holds MANAGE"):
        promote_approved(versions, run_id, None, "pilot passed", False)
    assert "champion" not in registry.current_aliases(name)
    site["admin"].grant_user_permission("alice", "registered_model", name, "MANAGE")
    move = promote_approved(versions, run_id, None, "pilot passed", False, four_eyes=True)
    assert registry.current_aliases(name)["champion"] == version
    assert move.user == "admin" and move.approval["approver"] == "alice"
    assert move.approval["identity"] == "authenticated MLflow user" and move.approval["promoted_by"] == "admin"
    shown = _vitops(_env(site, "viewer"), "history", name, "--alias", "champion")
    assert shown.returncode == 0 and "admin@" in shown.stdout and "alice" in shown.stdout, shown.stdout


def test_four_eyes_refuses_the_registering_user_and_the_promoter(site: dict[str, Any], as_admin: None) -> None:
    name = site["name"]
    _as("trainer", USERS["trainer"], site["url"])
    version = register(name, site["release"])  # trainer registered it: an admin, with MANAGE everywhere
    assert registry.version_info(name, version).tags[registry.REGISTERED_BY_TAG] == "trainer"
    _as("admin", site["admin_password"], site["url"])
    for approver, why in (("trainer", f"trainer registered version {version}"), ("admin", "admin started this")):
        run_id = f"run-of-{approver}"
        registry.set_version_tags(name, version, {ATTESTED_BY: approver, ATTESTED_RUN: run_id})
        versions = Versions(name, version, registry.current_aliases(name).get("champion"), None, {})
        record_approval(versions, "approved", approver, "mine", run_id)
        with pytest.raises(PilotError, match=f"four eyes \\(pilot.four_eyes\\): {why}"):
            promote_approved(versions, run_id, versions.champion, "r", False, four_eyes=True)
    assert registry.current_aliases(name).get("champion") != version
    unattested = Versions(name, version, registry.current_aliases(name).get("champion"), None, {})
    record_approval(unattested, "approved", "alice", "sent to Prefect by someone else", "run-x")
    with pytest.raises(PilotError, match="not attested in the registry by that MLflow user"):
        promote_approved(unattested, "run-x", unattested.champion, "r", False)
    assert [r.alias for r in aliases.history(name)].count("champion") <= 1


def test_a_tampered_engine_is_refused_on_the_authenticated_store(site: dict[str, Any], as_admin: None) -> None:
    name, version = site["name"], site["version"]
    info = registry.version_info(name, version)
    rel = "artifacts/engines/onnxruntime/fp32.onnx"
    found = list(Path(site["artifacts"]).rglob(f"{info.run_id}/artifacts/pyfunc/{rel}"))
    assert len(found) == 1
    data = bytearray(found[0].read_bytes())
    data[-32:] = bytes(255 - b for b in data[-32:])
    found[0].write_bytes(bytes(data))
    refused = _vitops(_env(site, "viewer"), "verify", f"{name}/{version}")
    assert refused.returncode == 1 and f"REFUSED: {rel}: sha256" in refused.stderr, refused.stderr
    with pytest.raises(registry.ArtifactCheckError, match=rel):
        registry.load_pyfunc(name, version)
