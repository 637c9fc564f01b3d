"""The shipped stand-in checkpoint is exactly what `vitops pretrain-standin` records for params.yaml's settings,
and says what it is: not public weights."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from safetensors import safe_open

from vitops.common.files import sha256_file
from vitops.flows.config import load_params
from vitops.flows.settings import same_named
from vitops.vit.standin import StandinSpec


def test_shipped_standin_matches_its_recorded_sha256_and_config(repo_root: Path) -> None:
    params = load_params(repo_root / "params.yaml")
    weights = repo_root / params.pretrain.out
    info = json.loads(weights.with_suffix(".json").read_text(encoding="utf-8"))
    assert sha256_file(weights) == info["weights_sha256"]
    assert info["spec"] == asdict(StandinSpec(**same_named(StandinSpec, params.pretrain)))
    assert params.train.source == f"file:{params.pretrain.out}"  # the quickstart fine-tunes from it
    with safe_open(str(weights), "pt") as fh:
        meta = fh.metadata()
    assert meta["vitops_standin"] == "true"
    for notice in (meta["notice"], info["notice"]):
        assert "NOT" in notice and "pretrained" in notice.lower()
