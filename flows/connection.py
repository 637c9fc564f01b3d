"""Reaching the tracking server and the Prefect API, with their credentials, within a time limit.

MLflow's client retries a refused connection 7 times with exponential backoff (about 250 s) and Prefect's client
raises a bare `httpx.ConnectError`; a command run against a server that is down should instead say so within
`tracking.connect_timeout_s` (20 s; `VITOPS_CONNECT_TIMEOUT_S` in the environment wins). So, before a command
talks to a server:

- `check_mlflow` asks the tracking server's `/health`, then one authenticated API call with the environment's
  `MLFLOW_TRACKING_USERNAME` and `MLFLOW_TRACKING_PASSWORD`, until the deadline;
- `check_prefect` does the same for `PREFECT_API_URL` with `PREFECT_API_AUTH_STRING`;
- `bound_mlflow_retries` sets MLflow's retry count (unless the environment sets one) to what fits in the limit, so
  a server that goes away mid-command fails as fast.

A wrong or missing credential is a `CredentialsRefused`, a server that does not answer a `ServerUnreachable`:
the CLI prints either as one message and exits 2. Local stores (a SQLite file, the ephemeral Prefect API) are
not checked. Only the standard library is used here: this module sits below the MLflow and Prefect modules.
"""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.error
import urllib.request

DEFAULT_TIMEOUT_S = 20.0
TIMEOUT_ENV = "VITOPS_CONNECT_TIMEOUT_S"
_BACKOFF_FACTOR, _JITTER = 2.0, 1.0  # MLflow's defaults (MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, _JITTER)


class ServerUnreachable(RuntimeError):
    """A server that did not answer within the connect timeout; the message names it and the setting."""


class CredentialsRefused(RuntimeError):
    """A server that refused the credentials (or their absence); the message names the variables to set."""


def connect_timeout(default: float = DEFAULT_TIMEOUT_S) -> float:
    """The time limit in effect: `VITOPS_CONNECT_TIMEOUT_S` when set, else `default` (params.yaml's)."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return float(default)
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if value <= 0:
        raise ServerUnreachable(f"{TIMEOUT_ENV}={text!r}: give the time limit in seconds, e.g. 20")
    return value


def bound_mlflow_retries(budget_s: float) -> int:
    """Set `MLFLOW_HTTP_REQUEST_MAX_RETRIES` (unless the environment sets it) to the most retries whose backoff
    fits in `budget_s`; the count in effect."""
    if os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES"):
        return int(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
    retries = retries_within(budget_s)
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(retries)
    return retries


def retries_within(budget_s: float) -> int:
    """How many retries urllib3's backoff (none before the first, then factor * 2^(n-1), each plus up to the jitter)
    spends at most `budget_s` on, at least 0."""
    retries, spent = 0, 0.0
    while True:
        n = retries + 1
        wait = (0.0 if n <= 1 else _BACKOFF_FACTOR * 2 ** (n - 1)) + _JITTER
        if spent + wait > budget_s * 0.75:  # the rest of the budget is for the requests themselves
            return retries
        retries, spent = n, spent + wait


def check_mlflow(uri: str, budget_s: float) -> None:
    """Check that the tracking server at `uri` answers and takes the environment's credentials.

    Raises:
        ServerUnreachable: no answer within `budget_s`.
        CredentialsRefused: the server asks for credentials that are missing or wrong (HTTP 401), or refuses them.
    """
    if not uri.startswith(("http://", "https://")):
        return
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    headers = {"Authorization": _basic(f"{user}:{password or ''}")} if user else {}
    headers = {"Authorization": f"Bearer {token}"} if token and not user else headers  # as MLflow's client does
    base = uri.rstrip("/")
    what = f"the MLflow tracking server at {uri}"
    _wait_for(f"{base}/health", {}, what, budget_s, "MLFLOW_TRACKING_URI")
    probe = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
    status, body = _request(probe, headers, max(2.0, budget_s / 4))
    if status == 401:
        given = f"as {user!r}" if user else "without credentials"
        raise CredentialsRefused(
            f"{what} refused the request {given} (HTTP 401: {_short(body)}): set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD to an MLflow user's name and password (an administrator creates users in "
            "MLflow's UI or with mlflow.server.get_app_client('basic-auth', ...).create_user)"
        )


def check_prefect(api_url: str, budget_s: float) -> None:
    """Check that the Prefect API at `api_url` answers and takes `PREFECT_API_AUTH_STRING`.

    Raises:
        ServerUnreachable: no answer within `budget_s`.
        CredentialsRefused: the API refuses the auth string, or its absence (HTTP 401).
    """
    if not api_url.startswith(("http://", "https://")):
        return
    auth = os.environ.get("PREFECT_API_AUTH_STRING", "")
    headers = {"Authorization": _basic(auth)} if auth else {}
    base = api_url.rstrip("/")
    what = f"the Prefect API at {api_url}"
    _wait_for(f"{base}/health", headers, what, budget_s, "PREFECT_API_URL", ok=(200, 401))
    status, body = _request(f"{base}/admin/version", headers, max(2.0, budget_s / 4))
    if status == 401:
        given = "the PREFECT_API_AUTH_STRING given" if auth else "no PREFECT_API_AUTH_STRING"
        raise CredentialsRefused(
            f"{what} refused {given} (HTTP 401): set PREFECT_API_AUTH_STRING to the server's "
            "PREFECT_SERVER_API_AUTH_STRING (user:password)"
        )


def _wait_for(url: str, headers: dict[str, str], what: str, budget_s: float, setting: str,
              ok: tuple[int, ...] = (200,)) -> None:  # fmt: skip
    """GET `url` until it answers one of `ok`, or raise ServerUnreachable at the deadline."""
    deadline = time.monotonic() + budget_s
    last = "no answer"
    while True:
        left = deadline - time.monotonic()
        try:
            status, body = _request(url, headers, max(0.5, min(5.0, left)))
        except OSError as err:
            last = str(getattr(err, "reason", err))
        else:
            if status in ok:
                return
            last = f"HTTP {status}: {_short(body)}"
        if time.monotonic() + 1.0 >= deadline:
            raise ServerUnreachable(
                f"{what} did not answer within {budget_s:g} s ({last}). Check that it is running and {setting} "
                f"points at it; the limit is tracking.connect_timeout_s in params.yaml, or {TIMEOUT_ENV}"
            )
        time.sleep(1.0)


def _request(url: str, headers: dict[str, str], timeout: float) -> tuple[int, str]:
    """(status, body) of a GET; HTTP errors are answers, connection errors raise OSError."""
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read(2000).decode("utf-8", "replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read(2000).decode("utf-8", "replace")


def _basic(pair: str) -> str:
    return "Basic " + base64.b64encode(pair.encode()).decode()


def _short(body: str) -> str:
    try:
        data = json.loads(body)
        body = data.get("message") or data.get("detail") or body if isinstance(data, dict) else body
    except ValueError:
        pass
    return " ".join(str(body).split())[:200]
