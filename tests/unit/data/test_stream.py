"""Streaming a sharded dataset's train split: what a stream yields, π_ref (cached or per batch), and a run on it."""
import logging

import numpy as np
import pytest
import torch

from po_cluster.config import ConfigError, parse_config
from po_cluster.data.images import Geometry
from po_cluster.data.pairs import DataError, dataset_eval_sets, load_preference_data
from po_cluster.data.stream_rows import dataset_meta, local_stream
from po_cluster.data.typographic import TypographicConfig, build_typographic
from po_cluster.train.loop import build_model, fit, prepare_data
from po_cluster.train.run import train
from po_cluster.train.stream import local_source
from typo_helpers import labelled_folder

GEOMETRY = Geometry(64)  # the shipped base's input: the dataset is built for the model that trains on it


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("stream")
    build_typographic(TypographicConfig(source=str(labelled_folder(root / "src", per_class=10)), out=str(root / "ds"),
                                        variants=2, seed=1, image_size=64, rows_per_shard=7))
    return str(root / "ds")


def _run(dataset, tower="full", steps=3):
    return parse_config({"data": {"dataset": dataset, "streaming": True}, "model": {"image_tower": tower},
                         "training": {"steps": steps, "batch_size": 8, "reg_batch_size": 8}})


def test_a_pass_yields_train_rows_only_in_a_seeded_order(dataset):
    meta = dataset_meta(dataset)
    train, _ = load_preference_data(dataset, split="train")
    held_out = {img.tobytes() for s in ("val", "test") for img in dataset_eval_sets(dataset, s)["attacked"].images}
    first = list(zip(range(8), local_stream(dataset, meta, False, 8, seed=3, geometry=GEOMETRY), strict=False))
    again = list(zip(range(8), local_stream(dataset, meta, False, 8, seed=3, geometry=GEOMETRY), strict=False))
    seen = [img.tobytes() for _, batch in first for img in batch["image"]]
    assert len(seen) == 64
    assert all(np.array_equal(a[1]["image"], b[1]["image"]) for a, b in zip(first, again, strict=True))
    assert set(seen) <= {img.tobytes() for img in train.images} and not set(seen) & held_out
    # one pass (64 train pairs, 8 a batch) holds every train pair once
    assert len(set(seen)) == len(train) == 64
    assert all(set(batch["chosen"]) <= set(range(4)) and (batch["chosen"] != batch["rejected"]).all()
               for _, batch in first)


@pytest.mark.parametrize("tower", ["full", "frozen", {"lora": {"rank": 2, "alpha": 4}}])
def test_pi_ref_per_batch_is_the_starting_model_even_after_training(dataset, tower):
    run = _run(dataset, tower)
    model = build_model(run, torch.device("cpu"))
    source = local_source(model, run, "{}")
    start = build_model(run, torch.device("cpu"))
    images = load_preference_data(dataset, split="train")[0].images[:6]
    fit(model, source, run)  # the weights move; θ_ref does not
    inputs, ref = source._inputs_and_ref({"image": images})  # rows without the cache's π_ref: per batch
    pref, reg = load_preference_data(dataset, split="train")
    expected = prepare_data(start, pref, reg, "{}").ref_pref_logps[:6]
    assert torch.allclose(ref, expected, atol=1e-5)
    with torch.no_grad():  # while the policy has moved away from it
        assert not torch.allclose(model(inputs, source.text_emb), expected, atol=1e-3)


def test_a_streaming_run_trains_and_saves(dataset, tmp_path):
    run = _run(dataset, steps=4).model_copy(update={"output_dir": str(tmp_path)})
    result = train(run)
    assert (result.checkpoint / "model.safetensors").exists() or any(result.checkpoint.iterdir())
    assert set(result.after) >= {"clean", "attacked", "kl"} and result.after != result.before


def test_streaming_needs_a_sharded_dataset_and_enough_rows(dataset, tmp_path):
    with pytest.raises(ConfigError, match="streaming needs data.dataset"):
        parse_config({"data": {"streaming": True}})
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "pairs.jsonl").write_text('{"image": "a.png", "chosen": "x", "rejected": "y"}\n')
    (tmp_path / "dataset.json").write_text("{}")
    with pytest.raises(DataError, match="streaming needs a dataset of Parquet shards"):
        dataset_meta(str(tmp_path))
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match=r"dataset.json: not valid JSON"):
        dataset_meta(str(tmp_path))
    with pytest.raises(DataError, match="fewer than 1000 pair rows"):
        next(local_stream(dataset, dataset_meta(dataset), False, 1000, seed=0, geometry=GEOMETRY))


def test_a_streaming_sweep_leaves_cpus_for_its_data_tasks(monkeypatch, dataset):
    import ray

    from po_cluster.config import SweepConfig
    from po_cluster.sweep import driver

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    base = {"data": {"dataset": dataset}, "training": {"batch_size": 8}}
    in_memory = SweepConfig.model_validate({"base": base, "scaling": {"num_workers": 2}})
    streamed = SweepConfig.model_validate({"base": {**base, "data": {"dataset": dataset, "streaming": True}},
                                           "scaling": {"num_workers": 2, "data_cpus": 2}})
    assert driver.max_concurrent_trials(in_memory) == 4  # 2 workers × 1 CPU a trial
    assert driver.max_concurrent_trials(streamed) == 2  # and 2 more for its Ray Data tasks


def test_passes_cover_the_run_from_the_dataset_counts(dataset):
    from po_cluster.data.stream_rows import passes_needed

    meta = dataset_meta(dataset)  # 32 train images, 64 train pairs
    assert passes_needed(meta, "pref", steps=20, batch=32) == 11 and passes_needed(meta, "reg", 20, 32) == 21
    assert passes_needed(meta, "pref", steps=1, batch=8) == 2 and passes_needed({"shards": []}, "pref", 20, 32) == 1


def test_a_changed_shard_fails_the_stream_naming_it(dataset, tmp_path):
    import shutil

    from po_cluster.data.shards import ShardError
    from po_cluster.data.stream_rows import read_numbered_shards

    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    meta = dataset_meta(str(copy))
    rows = read_numbered_shards({"shard": np.array([0, 1])}, str(copy), meta, "pair", False, GEOMETRY)
    assert len(rows["image"]) == len(rows["chosen"]) > 0 and rows["image"].shape[1:] == (64, 64, 3)
    shard = copy / meta["shards"][1]["path"]
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")
    with pytest.raises(ShardError, match=f"{meta['shards'][1]['path']}: sha256 differs"):
        read_numbered_shards({"shard": np.array([1])}, str(copy), meta, "pair", False, GEOMETRY)
    with pytest.raises(ShardError, match="sha256 differs"):
        list(zip(range(100), local_stream(str(copy), meta, False, 8, seed=0, geometry=GEOMETRY), strict=False))


def _by_image(images: np.ndarray, values) -> dict[bytes, np.ndarray]:
    return {image.tobytes(): np.asarray(value) for image, value in zip(images, values, strict=True)}


@pytest.mark.parametrize("tower", ["full", "frozen"])
def test_the_ref_cache_holds_each_rows_pi_ref_and_is_computed_once(dataset, tmp_path, monkeypatch, tower):
    import shutil

    from po_cluster.data.ref_files import read_ref_manifest
    from po_cluster.data.stream_rows import read_numbered_shards
    from po_cluster.train import ref_cache

    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy, ignore=shutil.ignore_patterns("ref"))
    run = _run(str(copy), tower)
    model = build_model(run, torch.device("cpu"))
    source = local_source(model, run, "{}")
    manifests = list((copy / "ref").glob("*/ref.json"))
    shards = len(dataset_meta(str(copy))["shards"])
    assert len(manifests) == 1 and len(list(manifests[0].parent.glob("*.parquet"))) == 2 * shards  # pairs, clean
    pref, reg = load_preference_data(str(copy), split="train")
    data = prepare_data(build_model(run, torch.device("cpu")), pref, reg, "{}")
    expected = {**_by_image(pref.images, data.ref_pref_logps), **_by_image(reg.images, data.ref_reg_logps)}
    manifest, meta = read_ref_manifest(str(manifests[0].parent), manifests[0].parent.name), dataset_meta(str(copy))
    for reg_stream in (False, True):  # each row's π_ref in the cache, as the starting model computes it
        batch = next(local_stream(str(copy), meta, reg_stream, 8, 0, GEOMETRY, manifest))
        assert batch["ref_logps"].shape == (8, 4)
        for image, logps in zip(batch["image"], batch["ref_logps"], strict=True):
            np.testing.assert_allclose(logps, expected[image.tobytes()], atol=1e-5)
    rows = next(source.pref)
    same_rows = next(local_stream(str(copy), meta, False, 8, run.training.seed, GEOMETRY, manifest))  # with pixels
    np.testing.assert_array_equal(rows["ref_logps"], same_rows["ref_logps"])
    assert ("image" in rows) == (tower != "frozen")  # a frozen tower's stream decodes no image
    inputs, ref = source._inputs_and_ref(rows)  # the cache's π_ref; a frozen tower's input, its cached f(x)
    assert torch.equal(ref, torch.as_tensor(rows["ref_logps"])) and inputs.dim() == (2 if tower == "frozen" else 4)
    if tower == "frozen":  # the cache's f(x), as the frozen tower would compute it
        with torch.no_grad():
            expected_emb = model.encode_image(model.pixels(same_rows["image"]), 0.0)
        torch.testing.assert_close(inputs, expected_emb, atol=1e-5, rtol=1e-5)
    # what a Ray Data task hands the worker: without pixels, the same rows less their images
    task = {pixels: read_numbered_shards({"shard": np.array([0, 1])}, str(copy), meta, "pair", False, GEOMETRY,
                                         manifest, pixels) for pixels in (True, False)}
    for image, logps in zip(task[True]["image"], task[True]["ref_logps"], strict=True):
        np.testing.assert_allclose(logps, expected[image.tobytes()], atol=1e-5)
    assert set(task[True]) - set(task[False]) == {"image"}
    for name, values in task[False].items():
        np.testing.assert_array_equal(values, task[True][name])
    monkeypatch.setattr(ref_cache, "compute_ref_cache", lambda *a: pytest.fail("computed again"))
    local_source(build_model(run, torch.device("cpu")), run, "{}")  # found under its key


def test_a_changed_ref_file_fails_naming_it_and_an_unwritable_dataset_streams_without_one(dataset, tmp_path,
                                                                                        monkeypatch, caplog):
    import shutil

    from po_cluster.data import ref_files
    from po_cluster.store.settings import StoreError

    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy, ignore=shutil.ignore_patterns("ref"))
    run = _run(str(copy))
    local_source(build_model(run, torch.device("cpu")), run, "{}")
    changed = sorted((copy / "ref").glob("*/pair-00001.parquet"))[0]
    changed.write_bytes(changed.read_bytes()[:-1] + b"\0")
    with pytest.raises(DataError, match=f"{changed.name}: sha256 differs"):
        stream = local_source(build_model(run, torch.device("cpu")), run, "{}").pref
        for _ in range(30):  # a pass is 8 batches: shard 1 is read
            next(stream)
    shutil.rmtree(copy / "ref")

    def refuse(location, data, *args, **kwargs):
        raise StoreError(f"{location}: permission denied")

    monkeypatch.setattr(ref_files, "write_bytes", refuse)
    with caplog.at_level(logging.WARNING, logger="po_cluster.train.ref_cache"):
        source = local_source(build_model(run, torch.device("cpu")), run, "{}")
    assert "π_ref is computed per batch" in caplog.text and "ref_logps" not in next(source.pref)
    assert source(0).ref_pref_logps.shape == (8, 4)


def test_the_ref_cache_key_follows_the_dataset_the_weights_and_the_template(dataset, tmp_path):
    import shutil

    from po_cluster.train.ref_cache import cache_key

    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy, ignore=shutil.ignore_patterns("ref"))
    run = _run(str(copy))
    key = cache_key(run, "{}")
    assert cache_key(run, "{}") == key and cache_key(run, "a photo of {}") != key
    assert cache_key(run.model_copy(update={"model": run.model.model_copy(update={"pretrained": "openai"})}),
                     "{}") != key
    meta = copy / "dataset.json"
    meta.write_text(meta.read_text().replace('"image_size"', '"image_size" ', 1))
    assert cache_key(run, "{}") != key


def test_rows_without_pixels_decode_no_image_and_need_the_cache(dataset, monkeypatch):
    from po_cluster.data import stream_rows

    meta = dataset_meta(dataset)
    monkeypatch.setattr(stream_rows, "load_image", lambda *a: pytest.fail("an image was decoded"))
    circle, square = meta["candidates"][:2]
    rows = stream_rows.decode_rows({"kind": ["pair", "regularization"], "split": ["train", "train"],
                                    "image_name": ["a.png", "b.png"], "image": [b"", b""], "chosen": [circle, ""],
                                    "rejected": [square, ""], "text": ["", circle]},
                                   "pair", False, GEOMETRY, meta["candidates"], pixels=False)
    assert set(rows) == {"chosen", "rejected"} and stream_rows.row_count(rows) == 1
    with pytest.raises(ValueError, match="need a π_ref cache"):
        stream_rows.shard_rows(dataset, meta, 0, "pair", False, GEOMETRY, ref=None, pixels=False)
