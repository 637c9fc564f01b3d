"""vitops: checked, recorded and fast fine-tuning, evaluation, engine builds and staged pilots for Vision
Transformers.

The repository's top-level folders install as the subpackages of this one import root (pyproject.toml maps
`vitops` to the repository root): `vitops.flows` (CLI, Prefect flows, stages, tracking and registry),
`vitops.deploy` (engines, latency, KPI gate), `vitops.vit` (models, data, training), `vitops.data_checks` (the
data gate) and `vitops.common` (helpers every layer needs). Run `vitops --help` or `python -m vitops --help`.
"""
