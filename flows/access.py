"""Who is asking, and may they: the identity the tracking server authenticated, and its permission on a model.

A tracking server started with `mlflow server --app-name basic-auth` checks every request's user and password
(`MLFLOW_TRACKING_USERNAME`, `MLFLOW_TRACKING_PASSWORD`) and keeps a permission per user and registered model
(READ, EDIT, MANAGE; admins may do anything). vitops reads both through MLflow's own client
(`mlflow.server.get_app_client("basic-auth", ...)`):

- `identity()`: the authenticated user, or `UNAUTHENTICATED` where the server authenticates nobody (a local store,
  a server without the auth app): then approvals work as before and the records say "unauthenticated";
- `require_manage(name, what)`: refuses (`AccessDenied`) a user without MANAGE on the model: approving a
  promotion and moving champion outside a pilot need it; `may_manage(name, user)` asks the same of another user
  (the promote step's second check of its approver, which needs an admin or the approver's own credentials).
"""

from __future__ import annotations

import functools
import getpass
import os
import re
from dataclasses import dataclass

from vitops.flows.registry import RegistryError, server_uri

UNAUTHENTICATED = "unauthenticated"
MANAGE = "MANAGE"


class AccessDenied(RegistryError):
    """The authenticated user may not do what was asked; the message names the user, the model and the fix."""


@dataclass(frozen=True)
class Identity:
    """Who the tracking server says the caller is."""

    user: str  # the MLflow user name, or UNAUTHENTICATED
    authenticated: bool
    admin: bool = False

    def describe(self) -> str:
        """`alice (MLflow user)`, `admin (MLflow admin)` or `unauthenticated`."""
        if not self.authenticated:
            return UNAUTHENTICATED
        return f"{self.user} (MLflow {'admin' if self.admin else 'user'})"


def identity() -> Identity:
    """The caller as the tracking server authenticated it (cached per server and user name)."""
    return _identity(server_uri(), os.environ.get("MLFLOW_TRACKING_USERNAME", ""))


@functools.lru_cache(maxsize=8)
def _identity(uri: str, user: str) -> Identity:
    if not uri.startswith(("http://", "https://")) or not user:
        return Identity(UNAUTHENTICATED, False)
    try:
        found = _auth_client(uri).get_user(user)
    except Exception as err:  # noqa: BLE001 - MlflowException or a plain HTTP error, read by its status
        status = _status(err)
        if status == 404:  # no basic-auth app on this server: it authenticates nobody
            return Identity(UNAUTHENTICATED, False)
        if status == 401:
            raise AccessDenied(
                f"the MLflow tracking server at {uri} refused the password of {user!r}: set "
                "MLFLOW_TRACKING_PASSWORD to that user's password"
            ) from None
        raise RegistryError(f"MLflow at {uri}: cannot read the user {user!r}: {err}") from err
    return Identity(found.username, True, bool(found.is_admin))


def who() -> str:
    """The name a record keeps: the MLflow user the tracking server authenticated, else the login name, marked
    unauthenticated."""
    me = identity()
    if me.authenticated:
        return me.user
    try:
        return f"{getpass.getuser()} ({UNAUTHENTICATED})"
    except (KeyError, OSError):  # no login name in some containers
        return f"unknown ({UNAUTHENTICATED})"


def permission(name: str, user: str) -> str:
    """The effective permission of `user` on registered model `name` (READ, EDIT, MANAGE, NO_PERMISSIONS).

    Raises:
        AccessDenied: the caller may not read another user's permission (only admins and the user may).
    """
    try:
        return str(_auth_client(server_uri()).get_user_permission(user, "registered_model", name).permission)
    except Exception as err:  # noqa: BLE001 - read by its status
        if _status(err) in (401, 403):
            raise AccessDenied(
                f"{identity().user} may not read the permission of {user!r} on {name} at {server_uri()}: run this "
                "step as an MLflow admin (the pilot's service account) or as that user"
            ) from None
        where = f"MLflow at {server_uri()}"
        raise RegistryError(f"{where}: cannot read the permission of {user!r} on {name}: {err}") from err


def may_manage(name: str, user: str) -> bool:
    """Whether `user` holds MANAGE on registered model `name` (admins hold it on every model)."""
    try:
        if _auth_client(server_uri()).get_user(user).is_admin:
            return True
    except Exception as err:  # noqa: BLE001 - a non-admin may not read other users: ask the permission itself
        if _status(err) not in (401, 403):
            raise RegistryError(f"MLflow at {server_uri()}: cannot read the user {user!r}: {err}") from err
    return permission(name, user) == MANAGE


def require_manage(name: str, what: str) -> Identity:
    """The caller's identity, if it may `what` on model `name`: MANAGE on it, or admin; anyone where the server
    authenticates nobody.

    Raises:
        AccessDenied: an authenticated user without MANAGE on the model.
    """
    me = identity()
    if not me.authenticated or me.admin:
        return me
    held = permission(name, me.user)
    if held != MANAGE:
        raise AccessDenied(
            f"{me.user} may not {what} of {name}: that needs MANAGE on the registered model, and {me.user} holds "
            f"{held} at {server_uri()}. Ask an MLflow admin to grant it (MLflow's UI, or the auth client's "
            f"grant_user_permission({me.user!r}, 'registered_model', {name!r}, 'MANAGE'))"
        )
    return me


def _auth_client(uri: str):  # noqa: ANN202 - mlflow.server.auth.client.AuthServiceClient
    from mlflow.server import get_app_client

    return get_app_client("basic-auth", tracking_uri=uri)


def _status(err: Exception) -> int | None:
    """The HTTP status behind an MLflow client error, where it says one."""
    code = getattr(err, "get_http_status_code", None)
    if callable(code):
        try:
            return int(code())
        except (TypeError, ValueError):
            pass
    found = re.search(r"error code (\d{3})", str(err))  # a body that was not JSON
    return int(found[1]) if found else None
