"""The registered pyfunc model: loaded by alias in a fresh process it predicts like the PyTorch model folder on
uint8 arrays and on PNG paths without importing vitops; its engine choice and fallbacks, in this process."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers.registry import CLASSES, Release, build_release, new_run, unique
from PIL import Image

from vitops.flows import aliases, packaging, pyfunc_model
from vitops.vit.bundle import load_bundle
from vitops.vit.data import create_transforms

VITOPS_PACKAGES = ("vit", "deploy", "flows", "data_checks", "common")


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    """The tiny release plus a stand-in TensorRT plan, measured fastest, that this model must skip, and an
    OpenVINO FP32 engine that `vitops build` chose (slower in the bench, as a noisy bench may have it)."""
    from vitops.deploy.openvino import build_ov_engine, make_plan
    from vitops.deploy.parity import torch_logits

    rel = build_release(tmp_path_factory.mktemp("release"), seed=3)
    x = np.random.default_rng(3).standard_normal((8, 3, 32, 32), dtype=np.float32)
    ov_engine, _ = build_ov_engine(
        rel.onnx, rel.engines[0].parents[1] / "openvino" / "fp32.zip", x, torch_logits(rel.model, x),
        make_plan("fp32", {"fp32": ""}), threads=1,
    )  # fmt: skip
    rel.engines.append(ov_engine)
    rel.serving["engines"].append(
        {"file": "openvino/fp32.zip", "target": "openvino", "precision": "fp32", "p50_ms": 0.9, "chosen": True}
    )
    plan = rel.engines[0].parents[1] / "tensorrt" / "fp16.plan"
    plan.parent.mkdir()
    plan.write_bytes(b"a TensorRT plan for some other GPU")
    Path(f"{plan}.json").write_text(json.dumps({"target": "tensorrt", "precision": "fp16", "runtime_version": "10.7"}))
    rel.engines.append(plan)
    rel.serving["engines"].append(
        {"file": "tensorrt/fp16.plan", "target": "tensorrt", "precision": "fp16", "p50_ms": 0.05}
    )
    return rel


def images(seed: int, shapes: list[tuple[int, int]]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


def torch_probs(release: Release, pictures: list[np.ndarray]) -> np.ndarray:
    """What the model folder says through timm's eval transform: the reference for every runtime."""
    model, meta = load_bundle(release.model_dir)
    transform = create_transforms(meta, is_training=False)
    x = torch.stack([transform(Image.fromarray(p)) for p in pictures])
    with torch.inference_mode():
        return torch.softmax(model(x), dim=1).numpy()


def check(frame: pd.DataFrame | dict, expected: np.ndarray) -> None:
    frame = pd.DataFrame(frame)
    probs = frame[[f"prob_{c}" for c in CLASSES]].to_numpy()
    assert list(frame["label"]) == [CLASSES[i] for i in expected.argmax(axis=1)]
    np.testing.assert_allclose(probs, expected, atol=1e-4)
    np.testing.assert_allclose(frame["confidence"], expected.max(axis=1), atol=1e-4)


LOADER = """
import json, sys
import numpy as np
import pandas as pd
import mlflow.pyfunc

uri, batch_file, paths, packages = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
model = mlflow.pyfunc.load_model(uri)
batch = np.load(batch_file)
out = {
    "batch": model.predict(batch).to_dict("list"),
    "paths": model.predict(np.array(paths, dtype=object)).to_dict("list"),
}
try:
    model.predict(paths)
    out["plain_list"] = "accepted"
except Exception as err:
    out["plain_list"] = type(err).__name__
impl = model.unwrap_python_model()
out["direct_frame"] = impl.predict(None, pd.DataFrame({"path": paths})).to_dict("list")
out["direct_single"] = impl.predict(None, batch[0]).to_dict("list")
out["engine"] = impl.engine
out["vitops_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in packages)
out["torch_imported"] = "torch" in sys.modules
out["pyfunc_model_file"] = sys.modules["pyfunc_model"].__file__
out["class_module"] = type(impl).__module__
print(json.dumps(out))
"""


@pytest.mark.integration
@pytest.mark.usefixtures("server")
def test_champion_loads_in_a_fresh_process_and_predicts_like_torch(
    release: Release, tmp_path: Path, repo_root: Path
) -> None:
    name = unique("pyfunc")
    tags = {"gate.passed": "true", "gate.reasons": ""}
    args = (release.model_dir, release.onnx, release.engines, release.serving, tags)
    version = packaging.register_version(name, new_run("pyfunc-tests"), *args)
    aliases.move_alias(name, "champion", version, expect="none", reason="test")

    batch = np.stack(images(0, [(40, 48)] * 4))  # not square, not img_size: resized and cropped
    np.save(tmp_path / "batch.npy", batch)
    files = images(1, [(30, 50), (64, 64), (20, 28)])  # one is smaller than the resize target
    paths = []
    for i, picture in enumerate(files):
        paths.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray(picture).save(paths[-1])
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            LOADER,
            f"models:/{name}@champion",
            str(tmp_path / "batch.npy"),
            json.dumps(paths),
            json.dumps(VITOPS_PACKAGES),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # nothing of the repo on sys.path but what the installed package brings
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    check(out["batch"], torch_probs(release, list(batch)))
    check(out["paths"], torch_probs(release, files))
    check(out["direct_frame"], torch_probs(release, files))
    check(out["direct_single"], torch_probs(release, [batch[0]]))
    assert out["plain_list"] == "MlflowException"  # a tensor signature refuses a list: pass an object array
    assert out["engine"]["file"] == "openvino/fp32.zip"  # the engine `vitops build` chose, in OpenVINO
    # the model is the shipped copy of pyfunc_model.py, imported as a top-level module from the model's code/
    assert out["class_module"] == "pyfunc_model" and out["vitops_modules"] == [] and not out["torch_imported"]
    shipped = Path(out["pyfunc_model_file"])
    assert shipped.parent.name == "code" and repo_root not in shipped.parents
    assert shipped.read_text() == (repo_root / "flows" / "pyfunc_model.py").read_text()
    # and its torch-aot runtime beside it (imported only to open a torch-aot engine)
    assert (shipped.parent / "aot_runtime.py").read_text() == (repo_root / "deploy" / "aot_runtime.py").read_text()


class _Context:
    def __init__(self, artifacts: dict[str, str]) -> None:
        self.artifacts = artifacts


def _context(release: Release, chosen: bool = True, isa: list[str] | None = None) -> _Context:
    return _Context(
        {
            "model": str(release.model_dir),
            "onnx": str(release.onnx),
            "engines": str(release.engines[0].parents[1]),
            "serving": str(_serving_file(release, chosen, isa)),
        }
    )


def _serving_file(release: Release, chosen: bool, isa: list[str] | None) -> Path:
    """serving.json as the registry writes it (each entry with its engine's metadata), plus a missing engine."""
    path = release.model_dir.parent / "serving.json"
    root = release.engines[0].parents[1]
    entries = []
    for entry in release.serving["engines"]:
        meta = json.loads((root / f"{entry['file']}.json").read_text())
        if isa is not None and entry["target"] == "openvino":
            meta["extra"]["isa"] = isa
        entries.append({**entry, "meta": meta, "chosen": chosen and entry.get("chosen", False)})
    entries.append({"file": "onnxruntime/gone.onnx", "target": "onnxruntime", "p50_ms": 0.2})
    path.write_text(json.dumps({"engines": entries}))
    return path


def test_chosen_openvino_engine_serves_and_onnxruntime_takes_over_where_it_cannot(
    release: Release, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pictures = images(4, [(32, 32), (40, 36)])
    model = pyfunc_model.ImageClassifier()
    model.load_context(_context(release))
    assert model.engine["target"] == "openvino" and model.engine["file"] == "openvino/fp32.zip"
    check(model.predict(None, np.array(pictures, dtype=object)), torch_probs(release, pictures))

    with caplog.at_level(logging.INFO):  # built on a CPU with AMX: not this machine's engine
        model.load_context(_context(release, isa=["AVX2", "AVX-512", "AMX-BF16", "AMX-INT8", "made-up"]))
    assert model.engine["file"] == "onnxruntime/fp32.onnx"
    assert "cannot open engine openvino/fp32.zip (built for another machine: ISA" in caplog.text

    monkeypatch.setitem(sys.modules, "openvino", None)  # a serving environment without openvino
    model.load_context(_context(release))
    assert model.engine["file"] == "onnxruntime/fp32.onnx"
    check(model.predict(None, np.array(pictures, dtype=object)), torch_probs(release, pictures))


def test_engine_choice_skips_tensorrt_and_unloadable_engines(
    release: Release, caplog: pytest.LogCaptureFixture
) -> None:
    model = pyfunc_model.ImageClassifier()
    with caplog.at_level(logging.INFO):
        model.load_context(_context(release, chosen=False))  # by bench p50 only
    assert model.engine["file"] == "onnxruntime/fp32.onnx" and model.engine["p50_ms"] == 0.4
    assert "skipping TensorRT engine tensorrt/fp16.plan: this model has no TensorRT runner" in caplog.text
    assert "cannot open engine onnxruntime/gone.onnx" in caplog.text
    pictures = images(2, [(32, 32), (33, 70)])
    check(model.predict(None, np.array(pictures, dtype=object)), torch_probs(release, pictures))


def test_without_onnxruntime_and_openvino_the_weights_run_in_torch(
    release: Release, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    monkeypatch.setitem(sys.modules, "openvino", None)
    model = pyfunc_model.ImageClassifier()
    model.load_context(_context(release))
    assert model.engine["target"] == "torch"
    pictures = images(3, [(36, 36)] * 2)
    check(model.predict(None, np.stack(pictures)), torch_probs(release, pictures))


def test_bad_inputs_are_clear_errors(release: Release) -> None:
    model = pyfunc_model.ImageClassifier()
    model.load_context(_context(release))
    with pytest.raises(ValueError, match="needs a `path` column"):
        model.predict(None, pd.DataFrame({"file": ["a.png"]}))
    with pytest.raises(ValueError, match="expected a uint8 RGB image"):
        model.predict(None, np.zeros((2, 8, 8, 3), dtype=np.float32))


def test_the_served_model_names_this_cpus_isa_as_the_openvino_build_does() -> None:
    """The shipped module carries its own copy of the ISA table; a copy that drifts would refuse every
    OpenVINO engine on the machine that built it."""
    from vitops.deploy.openvino import ISA_FLAGS, cpu_flags, cpu_isa

    assert pyfunc_model.ISA_FLAGS == ISA_FLAGS
    assert pyfunc_model._cpu_isa() == cpu_isa(cpu_flags())
