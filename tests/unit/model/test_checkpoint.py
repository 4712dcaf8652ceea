import json
import pickle

import pytest
import torch

from po_cluster.config import ModelConfig
from po_cluster.data import world
from po_cluster.model.aligned import AlignedCLIP
from po_cluster.model.checkpoint import (
    MANIFEST,
    WEIGHTS,
    CheckpointError,
    load_checkpoint,
    model_description,
    save_checkpoint,
)
from po_cluster.model.loading import load_clip


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(pretrained=None, image_tower="full")
    model = AlignedCLIP(load_clip(cfg), "full")
    with torch.no_grad():
        model.spectral.log_sigma.normal_(0, 0.3)
        model.spectral.skew.normal_(0, 0.3)
    folder = save_checkpoint(tmp_path / "ckpt", model, model_description(model, cfg, world.SHAPES, "{}"),
                             {"lr": 1.0}, {"clean": 0.5})
    return model, folder


def test_roundtrip_gives_identical_outputs(saved):
    model, folder = saved
    loaded, description = load_checkpoint(folder)
    assert description["architecture"] == "po-tiny-rn" and description["classnames"] == list(world.SHAPES)
    images = world.image_set("attacked", 8, 0).images
    with torch.no_grad():
        a = model.project(model.encode_image(model.pixels(images)), 1.3)
        b = loaded.project(loaded.encode_image(loaded.pixels(images)), 1.3)
    assert torch.equal(a, b)
    for name in ("model.json", "training.json", "metrics.json", MANIFEST, WEIGHTS):
        assert (folder / name).is_file()


def test_changed_byte_is_refused_naming_the_file(saved):
    _, folder = saved
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[-1] ^= 0xFF
    (folder / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=WEIGHTS):
        load_checkpoint(folder)


def test_missing_manifest_or_file_is_refused(saved):
    _, folder = saved
    (folder / "metrics.json").unlink()
    with pytest.raises(CheckpointError, match="metrics.json"):
        load_checkpoint(folder)
    (folder / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(folder)


def test_garbage_manifest_is_refused(saved):
    _, folder = saved
    (folder / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid manifest"):
        load_checkpoint(folder)


def test_loading_never_unpickles(saved, monkeypatch):
    _, folder = saved

    def forbidden(*args, **kwargs):
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    model, _ = load_checkpoint(folder)
    assert model is not None
    assert json.loads((folder / MANIFEST).read_text())["files"][WEIGHTS]["size"] > 0
