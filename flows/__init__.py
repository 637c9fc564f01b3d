"""Prefect flows, the `vitops` command line, parameter loading and the one module that talks to MLflow."""
