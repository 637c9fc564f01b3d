"""`vitops gate`, `register`, `promote`, `history` and `lineage` end to end on tiny trained models, against a real
MLflow server: the KPI verdict with its reasons, the version and its tags, `candidate` only when passed, the
checked promotion of a failed version only with a recorded override, and the champion as the next reference."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from helpers.projects import PRICES
from helpers.vit import write_digits, write_manifest, write_params, write_tiny_checkpoint
from mlflow import MlflowClient

from vitops.flows.cli import main

pytestmark = pytest.mark.integration
MODEL = "gate-digits"


def _set(params_file: Path, **sections: dict) -> Path:
    raw = yaml.safe_load(params_file.read_text())
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    params_file.write_text(yaml.safe_dump(raw))
    return params_file


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, mlflow_server: str) -> Iterator[Path]:
    """A candidate ViT and a CNN baseline, trained, evaluated, exported, built and benched once."""
    root = tmp_path_factory.mktemp("gate")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        write_digits(root / "data", size=60)
        write_manifest(root / "data", root / "manifest.csv")
        write_tiny_checkpoint(root / "pretrained.safetensors")
        params = write_params(root, root / "data", root / "manifest.csv", root / "pretrained.safetensors", epochs=1)
        _set(
            params,
            export={"out": str(root / "engines" / "model.onnx"), "parity_images": 16, "exporter": "torchscript"},
            engine={"out_dir": str(root / "engines"), "calibration_images": 16, "min_int8_top1_agreement": 0.5},
            bench={"warmup": 1, "iters": 10, "large_batch": 4, "out": str(root / "bench" / "latency.json")},
            tracking={"registered_model": MODEL},
            gate={"report": str(root / "gate" / "report.md"), "min_uplift_points": -100.0, "bootstrap_samples": 500},
            cost=PRICES,
        )
        p = ["--params", str(params)]
        assert main([*p, "train", "--baseline"]) == 0
        assert main([*p, "train"]) == 0
        assert main([*p, "evaluate"]) == 0
        assert main([*p, "evaluate", "--baseline"]) == 0
        assert main([*p, "build", "--target", "onnxruntime"]) == 0
        assert main([*p, "bench", "--iters", "10"]) == 0
        yield root


def _aliases(client: MlflowClient) -> dict[str, str]:
    from mlflow.exceptions import MlflowException

    try:
        return dict(client.get_registered_model(MODEL).aliases)
    except MlflowException:
        return {}


@pytest.fixture()
def params(project: Path, tracking: str) -> Path:
    return project / "params.yaml"


def test_gate_pass_registers_a_candidate_with_its_kpis(params: Path, tracking: str, capsys) -> None:
    _set(params, gate={"max_p95_ms": 1000.0, "max_tco_increase": None, "reference": "baseline"})
    assert main(["--params", str(params), "gate"]) == 0
    out = capsys.readouterr().out
    assert "KPIs of candidate against the baseline" in out
    assert "PASS accuracy/uplift_interval" in out and "onnxruntime-" in out and "McNemar" in out
    report = params.parent / "gate" / "report.md"
    assert {p.name for p in report.parent.iterdir()} >= {"report.md", "accuracy.png", "latency.png", "cost.png"}
    decision = json.loads((report.parent / "decision.json").read_text())
    assert decision["passed"] and decision["reference_kind"] == "baseline"
    assert decision["candidate"]["cost"]["monthly_tco"] > 300.0  # upkeep plus measured training and serving

    assert main(["--params", str(params), "register"]) == 0
    assert "alias candidate -> this version" in capsys.readouterr().out
    client = MlflowClient(tracking)
    version = client.get_model_version_by_alias(MODEL, "candidate")
    tags = version.tags
    assert tags["gate.passed"] == "true" and "uplift" in tags["gate.reasons"]
    assert {"data_version", "git_commit", "params_hash", "weights_sha256", "engines", "kpi.latency_p95_ms"} <= set(tags)
    assert "onnxruntime-int8" in tags["engines"]
    run = client.get_run(version.run_id)
    assert run.data.tags["gate.passed"] == "true" and "kpi.monthly_tco" in run.data.metrics


def test_gate_fail_gets_no_candidate_and_promotion_needs_a_recorded_override(params: Path, tracking: str, capsys):
    client = MlflowClient(tracking)
    before = _aliases(client).get("candidate")
    _set(params, gate={"max_p95_ms": 1e-6, "reference": "baseline"})
    assert main(["--params", str(params), "gate"]) == 1
    out = capsys.readouterr().out
    assert "FAIL latency/p95_ms" in out and "1e-06" in out
    assert main(["--params", str(params), "register"]) == 0
    assert "no alias (the gate failed)" in capsys.readouterr().out
    failed = max(int(v.version) for v in client.search_model_versions(f"name='{MODEL}'"))
    assert client.get_model_version(MODEL, str(failed)).tags["gate.passed"] == "false"
    assert _aliases(client).get("candidate") == before  # untouched

    promote = ["--params", str(params), "promote", MODEL, "--version", str(failed), "--expect", "none"]
    assert main(promote) == 2  # champion moves through a pilot's approval, or as a recorded admin override
    assert "moves through a pilot" in capsys.readouterr().err
    assert main([*promote, "--override-pilot"]) == 2  # an override needs a reason
    assert "--override-pilot needs --reason" in capsys.readouterr().err
    admin = [*promote, "--override-pilot", "--reason", "latency limit is for the edge box, not this pilot"]
    assert main(admin) == 2
    assert "did not pass the gate" in capsys.readouterr().err
    assert "champion" not in client.get_registered_model(MODEL).aliases
    assert main([*admin, "--override-gate"]) == 0
    out = capsys.readouterr().out
    assert f"{MODEL}@champion: none -> v{failed}" in out and "pilot override" in out
    assert client.get_registered_model(MODEL).aliases["champion"] == str(failed)

    assert main(["--params", str(params), "history", MODEL, "--json"]) == 0
    out = capsys.readouterr().out
    moves = [json.loads(line) for line in out.splitlines()]
    champion = [m for m in moves if m["alias"] == "champion"]
    assert len(champion) == 1 and champion[0]["override"] and "edge box" in champion[0]["reason"]
    assert champion[0]["note"].startswith("pilot override: champion moved outside a pilot")
    assert [m["alias"] for m in moves].count("candidate") >= 1

    assert main(["--params", str(params), "lineage", f"{MODEL}@champion"]) == 0
    lineage = capsys.readouterr().out
    print(lineage)
    assert lineage.startswith(f"{MODEL} version {failed} (aliases: champion")
    for part in ("data:", "training:", "evaluation:", "KPI gate: FAILED against baseline", "FAIL latency/p95_ms"):
        assert part in lineage
    assert "onnxruntime/int8.onnx  onnxruntime int8-dynamic" in lineage and "sha256 " in lineage
    assert f"champion: none -> v{failed}" in lineage and "[gate override]" in lineage


def test_the_champion_is_the_next_reference_re_evaluated_today(params: Path, tracking: str, capsys) -> None:
    _set(params, gate={"max_p95_ms": 1000.0, "reference": "auto", "max_tco_increase": None})
    if "champion" not in MlflowClient(tracking).get_registered_model(MODEL).aliases:
        pytest.skip("needs the champion of the previous test")
    assert main(["--params", str(params), "gate"]) == 0
    out = capsys.readouterr().out
    assert "against the champion v" in out
    decision = json.loads((params.parent / "gate" / "decision.json").read_text())
    # the same weights as the champion: re-evaluated on the same test split they tie, image for image
    assert decision["reference_kind"] == "champion"
    assert decision["uplift"]["points"] == 0 and decision["uplift"]["candidate_only"] == 0


def test_missing_or_negative_prices_are_named_and_nothing_is_registered(params: Path, tracking: str, capsys) -> None:
    raw = yaml.safe_load(params.read_text())
    versions = len(MlflowClient(tracking).search_model_versions(f"name='{MODEL}'"))
    bad = params.parent / "bad-prices.yaml"
    bad.write_text(yaml.safe_dump({**raw, "cost": {**raw["cost"], "serve_price_per_hour": -1}}))
    assert main(["--params", str(bad), "gate"]) == 2
    assert "cost.serve_price_per_hour" in capsys.readouterr().err
    bad.write_text(yaml.safe_dump({k: v for k, v in raw.items() if k != "cost"}))
    assert main(["--params", str(bad), "gate"]) == 2
    assert "no `cost` section" in capsys.readouterr().err
    assert len(MlflowClient(tracking).search_model_versions(f"name='{MODEL}'")) == versions
