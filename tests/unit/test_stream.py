"""Streaming a sharded dataset's train split: what a stream yields, π_ref per batch, and a run on it."""
import numpy as np
import pytest
import torch

from po_cluster.config import ConfigError, parse_config
from po_cluster.data.pairs import DataError, dataset_eval_sets, load_preference_data
from po_cluster.data.stream_rows import dataset_meta, local_stream
from po_cluster.data.typographic import TypographicConfig, build_typographic
from po_cluster.train.loop import build_model, fit, prepare_data, run_training
from po_cluster.train.stream import local_source
from typo_helpers import labelled_folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("stream")
    build_typographic(TypographicConfig(source=str(labelled_folder(root / "src", per_class=10)), out=str(root / "ds"),
                                        variants=2, seed=1, image_size=48, rows_per_shard=7))
    return str(root / "ds")


def _run(dataset, tower="full", steps=3):
    return parse_config({"data": {"dataset": dataset, "streaming": True}, "model": {"image_tower": tower},
                         "training": {"steps": steps, "batch_size": 8, "reg_batch_size": 8}})


def test_a_pass_yields_train_rows_only_in_a_seeded_order(dataset):
    meta = dataset_meta(dataset)
    train, _ = load_preference_data(dataset, split="train")
    held_out = {img.tobytes() for s in ("val", "test") for img in dataset_eval_sets(dataset, s)["attacked"].images}
    first = list(zip(range(8), local_stream(dataset, meta, False, 8, seed=3, size=48), strict=False))
    again = list(zip(range(8), local_stream(dataset, meta, False, 8, seed=3, size=48), strict=False))
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
    inputs, ref = source._inputs_and_ref(images)
    pref, reg = load_preference_data(dataset, split="train")
    expected = prepare_data(start, pref, reg, "{}").ref_pref_logps[:6]
    assert torch.allclose(ref, expected, atol=1e-5)
    with torch.no_grad():  # while the policy has moved away from it
        assert not torch.allclose(model(inputs, source.text_emb), expected, atol=1e-3)


def test_a_streaming_run_trains_and_saves(dataset, tmp_path):
    run = _run(dataset, steps=4).model_copy(update={"output_dir": str(tmp_path)})
    result = run_training(run)
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
        next(local_stream(dataset, dataset_meta(dataset), False, 1000, seed=0, size=48))


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
    rows = read_numbered_shards({"shard": np.array([0, 1])}, str(copy), meta, "pair", False, 48)
    assert len(rows["image"]) == len(rows["chosen"]) > 0 and rows["image"].shape[1:] == (48, 48, 3)
    shard = copy / meta["shards"][1]["path"]
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")
    with pytest.raises(ShardError, match=f"{meta['shards'][1]['path']}: sha256 differs"):
        read_numbered_shards({"shard": np.array([1])}, str(copy), meta, "pair", False, 48)
    with pytest.raises(ShardError, match="sha256 differs"):
        list(zip(range(100), local_stream(str(copy), meta, False, 8, seed=0, size=48), strict=False))
