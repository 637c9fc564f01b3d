"""Helpers shared by the test modules (tests/ is on sys.path under pytest, so they import as `helpers.NAME`):
data.py (image folders for the data tests), vit.py (tiny ViTs, digits, params files, a tiny training run),
engines.py (the export and engine tests' tiny ViT and inputs), registry.py (tiny releases registered in MLflow),
projects.py (a tiny git + DVC project for the flow tests), servers.py (server processes and the tracking URI),
pilot_runs.py (pilot stages run against a prediction log), endpoints.py (a `vitops endpoint` process in a process
group of its own, for the pilot and SIGKILL tests).
Fixtures shared by several modules live in tests/conftest.py; no test module imports another."""
