"""The endpoint's Prometheus metrics, correct across LitServe's processes.

Requests and routed answers are counted where HTTP is answered (the API-server processes), batches where they run
(the inference workers), swaps and guardrail breaches where they are decided (the follower), shadow scores in the
shadow process. prometheus-client's multiprocess mode adds them up: every
process writes its samples to files in `PROMETHEUS_MULTIPROC_DIR`, which `vitops endpoint` sets to a fresh
folder before any process imports prometheus_client, and `/metrics` collects that folder. Gauges say which
version is served with `mostrecent`: the value last set by any process (workers switch within one poll of
each other).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

_LATENCY = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)

REQUESTS = Counter(
    "vitops_endpoint_requests", "Requests answered, by route and the version and engine that answered (or would have)",
    ["model", "version", "engine", "route"],
)  # fmt: skip
ERRORS = Counter(
    "vitops_endpoint_errors", "Requests answered with an error, by HTTP status",
    ["model", "version", "engine", "route", "code"],
)  # fmt: skip
IMAGES = Counter("vitops_endpoint_images", "Images classified", ["model", "version", "engine"])
LATENCY = Histogram(
    "vitops_endpoint_request_seconds", "Time from a request's arrival to its answer", ["route"], buckets=_LATENCY
)
BATCH_IMAGES = Histogram("vitops_endpoint_batch_images", "Images in one engine batch", buckets=_SIZES)
BATCH_REQUESTS = Histogram("vitops_endpoint_batch_requests", "Requests in one dynamic batch", buckets=_SIZES)
INFERENCE = Histogram(
    "vitops_endpoint_inference_seconds", "Preprocessing and engine time of one batch", ["version"], buckets=_LATENCY
)
SWAPS = Counter("vitops_endpoint_swaps", "Versions switched to after passing their checks", ["model"])
SWAP_FAILURES = Counter(
    "vitops_endpoint_swap_failures", "Versions refused, by the check they failed", ["model", "version", "check"]
)
VERSION = Gauge("vitops_endpoint_version", "The version served", ["model"], multiprocess_mode="mostrecent")
SERVING = Gauge(
    "vitops_endpoint_serving", "1 for the version and engine served, 0 for those served before",
    ["model", "version", "engine"], multiprocess_mode="mostrecent",
)  # fmt: skip
REFUSED = Gauge(
    "vitops_endpoint_refused_version", "The last version refused by its checks (0: none)", ["model"],
    multiprocess_mode="mostrecent",
)  # fmt: skip
REGISTRY_ERRORS = Counter("vitops_endpoint_registry_errors", "Failed reads of the registry", ["model"])
# the pilot beside the champion: answers by route, the shadow's queue, the online guardrails
ROUTED = Counter(
    "vitops_endpoint_routed_answers", "Images answered, by route (champion or canary) and the version that answered",
    ["model", "version", "route"],
)  # fmt: skip
PILOT_ERRORS = Counter(
    "vitops_endpoint_pilot_errors", "Images the canary pilot failed on (the champion answered them)",
    ["model", "version", "route"],
)  # fmt: skip
SHADOW_DROPPED = Counter(
    "vitops_endpoint_shadow_dropped", "Images the shadow did not score: its queue was full, or no pilot was loaded",
    ["model", "reason"],
)  # fmt: skip
SHADOW_SCORED = Counter(
    "vitops_endpoint_shadow_scored", "Images the shadow pilot scored", ["model", "version", "status"]
)
SHADOW_SECONDS = Histogram(
    "vitops_endpoint_shadow_seconds", "Time the shadow took for one image, dequeue to answer", buckets=_LATENCY
)
BREACHES = Counter(
    "vitops_endpoint_guardrail_breaches", "Pilots stopped by an online guardrail, by the check that failed",
    ["model", "version", "check"],
)  # fmt: skip
PILOT = Gauge(
    "vitops_endpoint_pilot_version", "The pilot version beside the champion, by stage (0: none)", ["model", "stage"],
    multiprocess_mode="mostrecent",
)  # fmt: skip


def exposition() -> bytes:
    """All processes' samples in Prometheus' text format."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        raise RuntimeError("PROMETHEUS_MULTIPROC_DIR is not set: the endpoint's processes cannot share metrics")
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry)
