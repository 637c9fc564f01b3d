"""The shipped dvc.yaml: every stage is a thin call of a `vitops` command that parses, and every params section
it depends on is a section of params.yaml."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from vitops.flows.cli import build_parser
from vitops.flows.config import Params


def _commands(repo_root: Path) -> dict[str, str]:
    stages = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        if "foreach" in stage:
            for item in stage["foreach"]:
                out[f"{name}@{item}"] = stage["do"]["cmd"].replace("${item}", item)
        else:
            out[name] = stage["cmd"]
    return out


def test_every_stage_is_a_vitops_command_that_parses(repo_root: Path) -> None:
    commands = _commands(repo_root)
    assert {"validate", "train", "baseline", "export", "build", "bench", "gate", "register"} <= set(commands)
    parser = build_parser()
    for name, cmd in commands.items():
        argv = shlex.split(cmd)
        assert argv[0] == "vitops", name
        args = parser.parse_args(argv[1:])
        assert callable(args.handler), name


def test_stage_params_are_params_sections(repo_root: Path) -> None:
    sections = {f.alias or name for name, f in Params.model_fields.items()}
    stages = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        for key in (stage.get("do") or stage).get("params", []):
            assert key in sections, f"{name}: params section {key!r} is not in params.yaml"
