"""The line-side endpoint (`vitops endpoint NAME`): a LitServe service for one registered model that speaks the
Open Inference Protocol and follows a registry alias without a restart.

`server.py` starts it; `routes.py` is HTTP (in LitServe's API-server processes), `worker.py` inference and the
swap (in its worker processes), `follower.py` the registry (a process of its own), `state.py` the files through
which they talk, `metrics.py` Prometheus across all of them. docs/endpoint.md is the manual.
"""
