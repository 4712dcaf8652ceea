"""One image path: phone photos whose rotation is in EXIF get the same embedding, to 1e-5, read as
training data, sent to the served app's /v1/embeddings, and embedded by the embed job on the session's
Ray cluster; and that embedding is the upright picture's, not the stored pixels'.

(The decoding itself, every orientation and colour mode: tests/unit/data/test_images.py.)
"""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from po_cluster.data import world
from serving_helpers import b64, request

pytestmark = pytest.mark.integration
RELEASE, T, KEY = "r-photos", 0.8, "image-path-key"
ORIENTATIONS = (6, 8, 3)  # a quarter turn either way, and upside down


def _upright(seed: int) -> np.ndarray:
    """A tall picture, 192 × 80, unlike itself under any flip or turn: two different shapes one above the other."""
    rng = np.random.default_rng(seed)
    top, bottom = world.render(0, None, rng, size=96), world.render(2, 1, rng, size=96)
    return np.ascontiguousarray(np.concatenate([top, bottom])[:, 8:88])


def _stored(upright: np.ndarray, orientation: int) -> np.ndarray:
    """What a camera stores when it writes that EXIF orientation (the turn a viewer must undo)."""
    return {6: np.rot90(upright, 1), 8: np.rot90(upright, -1), 3: upright[::-1, ::-1]}[orientation]


def _undo(stored: np.ndarray, orientation: int) -> np.ndarray:
    return np.ascontiguousarray({6: np.rot90(stored, -1), 8: np.rot90(stored, 1), 3: stored[::-1, ::-1]}[orientation])


def _jpeg(pixels: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict:
    """Phone photos in a folder, a records file naming them, and one published release."""
    from po_cluster.serving.local import publish_example_release

    root = tmp_path_factory.mktemp("image-path")
    (root / "images").mkdir()
    names = []
    for i, orientation in enumerate(ORIENTATIONS):
        name = f"phone-{i}-o{orientation}.jpg"
        (root / "images" / name).write_bytes(_jpeg(_stored(_upright(i), orientation), orientation))
        names.append(name)
    records = [{"image": f"images/{name}", "chosen": "a photo of a circle.", "rejected": "a photo of a star."}
               for name in names]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    publish_example_release(str(root / "store"), RELEASE, str(root / "checkpoints"), seed=5)
    return {"root": root, "names": names}


@pytest.fixture(scope="module")
def model(photos):
    from po_cluster.model.checkpoint import load_checkpoint
    from po_cluster.store.artifacts import open_store

    folder = open_store(str(photos["root"] / "store")).pull_release(RELEASE, photos["root"] / "cache-tests")
    return load_checkpoint(folder)[0]


@torch.no_grad()
def _embed(model, pixels: np.ndarray) -> np.ndarray:
    """Model input → image embedding of the release at T, in this process."""
    return model.project(model.encode_image(model.pixels(pixels)), T).numpy()


@pytest.fixture(scope="module")
def trained(photos, model) -> np.ndarray:
    """(a) The training data path: the records file read as the trainer reads it, at the model's size."""
    from po_cluster.data.pairs import load_preference_data

    pref, _ = load_preference_data(str(photos["root"] / "pairs.jsonl"), model.preprocess.geometry)
    assert pref.images.shape == (len(ORIENTATIONS), model.image_size, model.image_size, 3)
    return _embed(model, pref.images)


@pytest.fixture(scope="module")
def embedded(ray_cluster, photos) -> np.ndarray:
    """(c) The embed job over the folder, rows in file-name order."""
    from po_cluster.embed.job import EmbedConfig, run_embed

    root = photos["root"]
    cfg = EmbedConfig.model_validate({
        "input": str(root / "images"), "output": str(root / "embedded"), "store": str(root / "store"),
        "release": RELEASE, "t": T, "shard_size": 8, "batch_size": 8, "decode_batch_size": 8,
        "store_settings": {"cache_dir": str(root / "cache-job")}})
    summary = run_embed(cfg)
    assert (summary.ok, summary.failed) == (len(ORIENTATIONS), 0)
    rows = pq.read_table(str(root / "embedded" / "embeddings")).sort_by("id")
    assert rows.column("id").to_pylist() == photos["names"]
    return np.array(rows.column("embedding").to_pylist(), dtype=np.float32)


@pytest.fixture(scope="module")
def served(embedded, photos) -> np.ndarray:
    """(b) /v1/embeddings of the served app, all photos in one request. Started after the embed job
    (`embedded`) has finished, so that the two do not compete for the session cluster's two CPUs."""
    from po_cluster.serving.local import start_local

    root = photos["root"]
    (root / "api-keys").write_text(f"{KEY}\n")
    args = {"store": str(root / "store"), "store_settings": {"cache_dir": str(root / "cache-serve")},
            "model": {"num_cpus": 1}, "gateway": {"num_cpus": 0}, "auth": {"api_keys_file": str(root / "api-keys")}}
    server = start_local(args, num_cpus=2)
    try:
        inputs = [{"type": "image", "image": b64((root / "images" / name).read_bytes())} for name in photos["names"]]
        status, answer = request(server.url, "POST", "/v1/embeddings",
                                 {"model": RELEASE, "t": T, "input": inputs}, key=KEY)
    finally:
        server.stop()
    assert status == 200, answer
    assert [d["index"] for d in answer["data"]] == list(range(len(ORIENTATIONS)))
    return np.array([d["embedding"] for d in answer["data"]], dtype=np.float32)


def test_training_serving_and_the_embed_job_give_one_embedding(trained, served, embedded, photos):
    for i, name in enumerate(photos["names"]):
        np.testing.assert_allclose(served[i], trained[i], atol=1e-5, err_msg=f"{name}: served vs training")
        np.testing.assert_allclose(embedded[i], trained[i], atol=1e-5, err_msg=f"{name}: embed job vs training")


def test_that_embedding_is_the_upright_picture(trained, photos, model):
    for i, (name, orientation) in enumerate(zip(photos["names"], ORIENTATIONS, strict=True)):
        raw = (photos["root"] / "images" / name).read_bytes()
        as_stored = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))  # a reader that ignores EXIF
        assert as_stored.shape == ((192, 80, 3) if orientation == 3 else (80, 192, 3))
        upright = _embed(model, _undo(as_stored, orientation)[None])[0]  # the decoded file, turned by hand
        np.testing.assert_allclose(trained[i], upright, atol=1e-5, err_msg=name)
        sideways = _embed(model, as_stored[None])[0]
        assert np.abs(sideways - upright).max() > 1e-3, name  # the model sees the difference
