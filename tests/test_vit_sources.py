"""Model sources: hub cache (real timm + huggingface_hub, offline), files, folders, and clear failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.vit import TINY_KW, TINY_VIT, write_tiny_checkpoint

from vitops.vit.sources import SourceError, create_model, parse_source


def _build_hub_cache(cache: Path, repo: str, state: dict, config: dict) -> Path:
    """Lay out a Hugging Face cache entry (models--org--name/snapshots/<rev>, refs/main) for `repo`."""
    from safetensors.torch import save_file

    rev = "0123456789abcdef0123456789abcdef01234567"
    base = cache / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / rev
    snap.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(rev)
    save_file(state, str(snap / "model.safetensors"))
    (snap / "config.json").write_text(json.dumps(config))
    return snap


@pytest.fixture()
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _tiny_state(num_classes: int = 5) -> dict:
    import timm

    torch.manual_seed(7)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=num_classes, img_size=32, **TINY_KW)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def test_hf_hub_source_loads_from_offline_cache_with_new_head(hub_cache: Path) -> None:
    state = _tiny_state(num_classes=5)
    config = {
        "architecture": "vit_tiny_patch16_224",
        "num_classes": 5,
        "model_args": {"img_size": 32, **TINY_KW},
        "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "classifier": "head"},
    }
    _build_hub_cache(hub_cache, "timm/vitops-test-tiny", state, config)
    model, arch, _ = create_model("hf-hub:timm/vitops-test-tiny", "ignored", num_classes=3, img_size=32)
    assert arch == "vit_tiny_patch16_224"
    assert model.head.out_features == 3
    loaded = model.state_dict()
    assert torch.equal(loaded["blocks.1.mlp.fc1.weight"], state["blocks.1.mlp.fc1.weight"])
    assert torch.equal(loaded["pos_embed"], state["pos_embed"])


def test_timm_tag_source_reads_cache_and_resamples_to_new_img_size(hub_cache: Path) -> None:
    state = _tiny_state(num_classes=1000)
    _build_hub_cache(
        hub_cache, "timm/vit_tiny_patch16_224.augreg_in21k", state, {"architecture": "vit_tiny_patch16_224"}
    )
    model, arch, _ = create_model(
        "timm:vit_tiny_patch16_224.augreg_in21k", "vit_tiny_patch16_224", 4, img_size=48, model_kwargs=TINY_KW
    )
    assert arch == "vit_tiny_patch16_224"
    # 48 / 8 = 6x6 patches plus the class token: position embeddings were resampled from 4x4.
    assert model.pos_embed.shape[1] == 37
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])
    assert model(torch.zeros(1, 3, 48, 48)).shape == (1, 4)


def test_uncached_hub_model_gives_clear_error_not_random_weights(hub_cache: Path) -> None:
    with pytest.raises(SourceError) as err:
        create_model("hf-hub:timm/vit_small_patch16_224.augreg_in21k_ft_in1k", "x", num_classes=3, img_size=32)
    text = str(err.value)
    assert "hf-hub:timm/vit_small_patch16_224.augreg_in21k_ft_in1k" in text
    assert "cache" in text and "file:" in text


def test_file_source_resamples_patch_and_position_embeddings(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    state = write_tiny_checkpoint(path, num_classes=7)
    model, _, kwargs = create_model(
        f"file:{path}", "vit_tiny_patch16_224", 10, img_size=48, model_kwargs={"patch_size": 4, "depth": 2}
    )
    assert kwargs == {"patch_size": 4, "depth": 2}
    assert model.patch_embed.proj.weight.shape[-1] == 4  # 8x8 kernel resampled to 4x4
    assert model.pos_embed.shape[1] == 1 + 12 * 12
    assert model.head.out_features == 10
    assert torch.equal(model.state_dict()["blocks.1.norm1.weight"], state["blocks.1.norm1.weight"])


def test_file_source_from_model_folder_uses_its_architecture(tmp_path: Path) -> None:
    from vitops.vit.bundle import ModelMeta, save_bundle

    trained, _, _ = create_model("scratch", "vit_tiny_patch16_224", 3, 32, TINY_VIT, allow_scratch=True)
    save_bundle(trained, ModelMeta("vit_tiny_patch16_224", ["a", "b", "c"], 32, model_kwargs=TINY_VIT), tmp_path / "m")
    model, arch, kwargs = create_model(f"file:{tmp_path / 'm'}", "resnet18", 5, img_size=32)
    assert arch == "vit_tiny_patch16_224" and kwargs == TINY_VIT
    assert torch.equal(model.pos_embed, trained.pos_embed)


def test_missing_file_names_the_source_and_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"file:.*nope\.safetensors.*does not exist.*Provide weights"):
        create_model(f"file:{tmp_path / 'nope.safetensors'}", "vit_tiny_patch16_224", 3, 32, TINY_VIT)


def test_torch_file_with_pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "hook": Path("/etc/passwd")}, path)  # a non-tensor object needs full unpickling
    with pytest.raises(SourceError, match="weights_only=True"):
        create_model(f"file:{path}", "vit_tiny_patch16_224", 3, 32, TINY_VIT)


def test_torch_file_of_tensors_loads(tmp_path: Path) -> None:
    state = write_tiny_checkpoint(tmp_path / "w.safetensors")
    torch.save({"model": state}, tmp_path / "w.pth")
    model, _, _ = create_model(f"file:{tmp_path / 'w.pth'}", "vit_tiny_patch16_224", 3, 32, TINY_VIT)
    assert torch.equal(model.cls_token, state["cls_token"])


def test_checkpoint_of_another_architecture_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "deep.safetensors"
    write_tiny_checkpoint(path, depth=3)
    with pytest.raises(SourceError, match="does not match the architecture"):
        create_model(f"file:{path}", "vit_tiny_patch16_224", 3, 32, TINY_VIT)


def test_scratch_needs_explicit_permission() -> None:
    with pytest.raises(SourceError, match="random weights"):
        create_model("scratch", "vit_tiny_patch16_224", 3, 32, TINY_VIT)
    model, _, _ = create_model("scratch", "resnet18", 3, 32, allow_scratch=True)
    assert model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


@pytest.mark.parametrize("text", ["vit_small", "s3:bucket/x", "hf-hub:vit_small", "mlflow:models:/m@champion"])
def test_bad_or_unresolved_source_strings(text: str) -> None:
    with pytest.raises(SourceError):
        parse_source(text)
