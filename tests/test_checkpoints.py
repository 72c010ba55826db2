"""Real CLIP through `load_clip`: local checkpoint files round-trip, wrong ones fail clearly (no network)."""
from __future__ import annotations

import open_clip
import pytest
import torch
from torch import nn

from fedpgp_ray.clip.backbone import CheckpointError, load_clip, register_project_models
from fedpgp_ray.config import ModelConfig


def tiny_model(**overrides) -> nn.Module:
    register_project_models()
    torch.manual_seed(0)
    return open_clip.create_model("fedpgp-tiny", **overrides)


def test_local_checkpoint_round_trip(tmp_path):
    model = tiny_model()
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    clip = load_clip(ModelConfig(name="fedpgp-tiny", pretrained=str(path)), device="cpu")
    loaded = clip.model.state_dict()
    expected = model.state_dict()
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    assert clip.identity.startswith("fedpgp-tiny/sha256:")
    assert not any(p.requires_grad for p in clip.model.parameters())
    image = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        want = nn.functional.normalize(model.eval().encode_image(image), dim=-1)
    assert torch.allclose(clip.encode_images(image), want, atol=1e-6)


def test_wrapped_state_dict_loads_too(tmp_path):
    """Training scripts often save {"state_dict": ...}, with DataParallel's "module." prefix."""
    model = tiny_model()
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, path)
    clip = load_clip(ModelConfig(name="fedpgp-tiny", pretrained=str(path)), device="cpu")
    assert torch.equal(clip.model.logit_scale, model.logit_scale)


def test_missing_checkpoint_names_the_path(tmp_path):
    path = tmp_path / "nope" / "ViT-B-16.pt"
    with pytest.raises(CheckpointError) as err:
        load_clip(ModelConfig(name="fedpgp-tiny", pretrained=str(path)), device="cpu")
    assert f"checkpoint file not found: {path}" in str(err.value)


def test_checkpoint_of_another_architecture(tmp_path):
    other = tiny_model(embed_dim=64)  # same family, different projection width
    path = tmp_path / "other.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        load_clip(ModelConfig(name="fedpgp-tiny", pretrained=str(path)), device="cpu")
    msg = str(err.value)
    assert str(path.resolve()) in msg and "'fedpgp-tiny'" in msg and "same architecture" in msg
    assert "size mismatch" in msg


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_bytes(b"just some text, not a torch file")
    with pytest.raises(CheckpointError, match=r"notes\.pt could not be loaded into model 'fedpgp-tiny'"):
        load_clip(ModelConfig(name="fedpgp-tiny", pretrained=str(path)), device="cpu")


def test_torchscript_archive_gets_conversion_advice(tmp_path):
    path = tmp_path / "ViT-B-16.pt"
    with pytest.warns(Warning):  # torch.jit.save is deprecated in this torch
        torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(path))
    with pytest.raises(CheckpointError, match=r"ViT-B-16\.pt is a TorchScript archive.*fedpgp-tiny-quickgelu"):
        load_clip(ModelConfig(name="fedpgp-tiny", pretrained=str(path)), device="cpu")


def test_unknown_tags_are_checked_before_any_download():
    with pytest.raises(CheckpointError, match=r"unknown pretrained tag 'opnai' for model 'ViT-B-16'.*openai"):
        load_clip(ModelConfig(name="ViT-B-16", pretrained="opnai"), device="cpu")
    with pytest.raises(CheckpointError, match=r"unknown pretrained tag 'laion' for model 'fedpgp-tiny'"):
        load_clip(ModelConfig(name="fedpgp-tiny", pretrained="laion"), device="cpu")
    with pytest.raises(CheckpointError, match=r"unknown model 'ViT-B-61'"):
        load_clip(ModelConfig(name="ViT-B-61", pretrained="openai"), device="cpu")


def test_openai_tag_uses_quickgelu_and_fails_clearly_offline(monkeypatch):
    """ViT-B-16 + 'openai' is built with QuickGELU (what OpenAI trained with); no network is touched."""
    seen = {}

    def offline(name, **kwargs):
        seen.update(kwargs, name=name)
        raise RuntimeError("Failed to download weights for tag 'openai': no network")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", offline)
    with pytest.raises(CheckpointError) as err:
        load_clip(ModelConfig(name="ViT-B-16", pretrained="openai"), device="cpu")
    assert seen["name"] == "ViT-B-16" and seen["pretrained"] == "openai" and seen["force_quick_gelu"] is True
    msg = str(err.value)
    assert "'openai' for model 'ViT-B-16' are not available" in msg and "local checkpoint file" in msg


def test_flowers102_names_from_torchvision():
    """The names `data.download` writes for Flowers102 (Oxford's label order, as in CoOp's split file)."""
    from fedpgp_ray.data.coop import flowers102_classnames

    names = flowers102_classnames()
    assert len(names) == 102 and len(set(names)) == 102
    assert names[:3] == ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"]
