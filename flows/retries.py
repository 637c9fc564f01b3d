"""The retry policy of the flows' tasks: retry only what fails for a while and then works (the tracking server or
the DVC remote out of reach); a gate that says no, a bad parameter or a bug fails the same way every time."""

from __future__ import annotations

from typing import Any

TRANSIENT_RETRIES = 2


def is_transient(error: BaseException | None) -> bool:
    """Whether a failure is worth a retry: the tracking server or the DVC remote could not be reached. A gate
    that says no, a bad parameter or a bug fail the same way every time and are never retried."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ConnectionError | TimeoutError):
            return True
        text = str(error)
        if any(s in text for s in ("Connection refused", "Max retries exceeded", "timed out", "Temporary failure")):
            return True
        error = error.__cause__ or error.__context__
    return False


def _retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except Exception as err:
        return is_transient(err)
    return False


# `@task(**TRANSIENT)`: a task that talks to a server retries a transient failure twice, 5 s apart.
TRANSIENT = {"retries": TRANSIENT_RETRIES, "retry_delay_seconds": 5, "retry_condition_fn": _retry_transient}
