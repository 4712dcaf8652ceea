"""Batch embedding on Ray Data, on the session's Ray cluster.

One folder of 500 files (488 images, 12 bad ones of every kind) and one release
(the shipped base model with a random spectral layer) serve every test; the
module's reference run is the uninterrupted job the others are compared with.
"""
from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from po_cluster.data import world
from serving_helpers import bomb_png, encode

RELEASE, T, SHARD_SIZE = "r-embed", 0.75, 25
N_GOOD_PNG = 480
# file name → the code its error must carry
BAD_FILES = {
    "bad/truncated-a.png": "corrupt_image", "bad/truncated-b.png": "corrupt_image",
    "bad/text-a.png": "not_an_image", "bad/text-b.png": "not_an_image",
    "bad/anim-a.gif": "unsupported_image_format", "bad/anim-b.gif": "unsupported_image_format",
    "bad/scan-a.tiff": "unsupported_image_format", "bad/scan-b.tiff": "unsupported_image_format",
    "bad/bomb-a.png": "image_too_many_pixels", "bad/bomb-b.png": "image_too_many_pixels",
    "bad/empty.png": "empty_image", "bad/broken.jpg": "corrupt_image",
}


def _write_images(root: Path) -> list[str]:
    """500 files: 480 world PNGs (64 px), 8 JPEGs of another size (resized by the model), 12 bad ones."""
    images = world.image_set("attacked", N_GOOD_PNG + 2, seed=11).images
    good = []
    for i, image in enumerate(images[:N_GOOD_PNG]):
        name = f"shapes/{i % 4}/img-{i:04d}.png"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(encode(image))
        good.append(name)
    rng = np.random.default_rng(3)
    (root / "photos").mkdir()
    for i in range(8):
        image = world.render(i % len(world.SHAPES), None, rng, size=96)[:, 8 + i:88 + i]  # 96 × 80
        (root / f"photos/p{i}.jpg").write_bytes(encode(np.ascontiguousarray(image), "JPEG"))
        good.append(f"photos/p{i}.jpg")
    png, jpeg = encode(images[-1]), encode(images[-2], "JPEG")
    contents = {"bad/truncated-a.png": png[:60], "bad/truncated-b.png": png[:len(png) // 2],
                "bad/text-a.png": b"hello, I am a text file", "bad/text-b.png": b"id,label\n1,circle\n",
                "bad/anim-a.gif": encode(images[-1], "GIF"), "bad/anim-b.gif": encode(images[-2], "GIF"),
                "bad/scan-a.tiff": encode(images[-1][:8, :8], "TIFF"), "bad/scan-b.tiff": encode(images[-2], "TIFF"),
                "bad/bomb-a.png": bomb_png(), "bad/bomb-b.png": bomb_png(5000, 4000),
                "bad/empty.png": b"", "bad/broken.jpg": jpeg[:len(jpeg) // 2]}
    (root / "bad").mkdir()
    for name, data in contents.items():
        (root / name).write_bytes(data)
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden: not an input
    assert len(good) + len(contents) == 500
    return sorted(good)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    from po_cluster.serving.local import publish_example_release

    root = tmp_path_factory.mktemp("embed")
    images, store = root / "images", root / "store"
    images.mkdir()
    good = _write_images(images)
    publish_example_release(str(store), RELEASE, str(root / "checkpoints"), seed=0)
    return {"root": root, "images": images, "store": store, "good": good}


def _config(corpus: dict, output: Path | str, **change):
    from po_cluster.embed.job import EmbedConfig

    fields = {"input": str(corpus["images"]), "output": str(output), "store": str(corpus["store"]),
              "release": RELEASE, "t": T, "shard_size": SHARD_SIZE, "batch_size": 32, "decode_batch_size": 32,
              "store_settings": {"cache_dir": str(corpus["root"] / "cache")}}
    return EmbedConfig.model_validate(fields | change)


def _read(output: Path | str, sub: str, filesystem=None):
    """The output read back sorted by id, as one table."""
    path = f"{output}/{sub}"
    table = pq.read_table(path, filesystem=filesystem) if filesystem else pq.read_table(path)
    return table.sort_by("id")


@pytest.fixture(scope="module")
def reference(ray_cluster, corpus) -> dict:
    """The uninterrupted job."""
    from po_cluster.embed.job import run_embed

    output = corpus["root"] / "reference"
    reports = []
    started = time.perf_counter()
    summary = run_embed(_config(corpus, output), on_shard=reports.append)
    print(f"\nreference job: {summary.line()}  [{time.perf_counter() - started:.1f} s]")
    return {"output": output, "summary": summary, "reports": reports}


def test_every_good_image_has_a_row_and_every_bad_one_an_error(corpus, reference):
    summary = reference["summary"]
    assert (summary.ok, summary.failed) == (488, 12)
    assert summary.shards == summary.shards_written == 20 and summary.shards_skipped == 0
    assert [r.index for r in reference["reports"]] == list(range(20))  # a line per shard, in order
    rows = _read(reference["output"], "embeddings")
    assert rows.column("id").to_pylist() == corpus["good"]  # each good image once
    assert rows.column("source_uri").to_pylist() == [str(corpus["images"] / name) for name in corpus["good"]]
    assert set(rows.column("release_id").to_pylist()) == {RELEASE} and set(rows.column("t").to_pylist()) == {T}
    assert set(rows.column("embed_dim").to_pylist()) == {64}
    assert str(rows.schema.field("embedding").type) == "list<element: float>"
    vectors = np.array(rows.column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    errors = _read(reference["output"], "errors")
    assert dict(zip(errors.column("id").to_pylist(), errors.column("code").to_pylist(), strict=True)) == BAD_FILES
    assert all(errors.column("reason").to_pylist())
    reasons = dict(zip(errors.column("id").to_pylist(), errors.column("reason").to_pylist(), strict=True))
    assert "GIF" in reasons["bad/anim-a.gif"] and "TIFF" in reasons["bad/scan-a.tiff"]
    assert "16777216 pixels" in reasons["bad/bomb-a.png"] and "5000×4000" in reasons["bad/bomb-b.png"]
    assert summary.images_per_s > 0 and "images/s" in summary.line()


@torch.no_grad()
def test_embeddings_equal_the_serving_engine_and_the_in_process_model(corpus, reference):
    from po_cluster.model.checkpoint import load_checkpoint
    from po_cluster.model.release import Knob, ReleaseModel
    from po_cluster.serving.limits import LimitsConfig, decode_image
    from po_cluster.store.artifacts import open_store

    folder = open_store(str(corpus["store"])).pull_release(RELEASE, corpus["root"] / "cache-tests")
    engine = ReleaseModel.load(RELEASE, folder)
    model, _ = load_checkpoint(folder)
    rows = _read(reference["output"], "embeddings")
    by_id = dict(zip(rows.column("id").to_pylist(), rows.column("embedding").to_pylist(), strict=True))
    names = [n for n in corpus["good"] if n.startswith("photos/")] + corpus["good"][::61]
    for name in names:
        raw = (corpus["images"] / name).read_bytes()
        image = decode_image(base64.b64encode(raw).decode(), "image", LimitsConfig())  # what the endpoint decodes
        served = engine.project(engine.image_features([image]), [Knob(T)])[0].numpy()
        in_process = model.project(model.encode_image(model.pixels(image[None])), T)[0].numpy()
        np.testing.assert_allclose(by_id[name], served, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(by_id[name], in_process, atol=1e-5, err_msg=name)
        at_t0 = model.project(model.encode_image(model.pixels(image[None])), 0.0)[0].numpy()
        assert np.abs(np.asarray(by_id[name]) - at_t0).max() > 1e-3  # t was applied


def test_decoding_runs_in_cpu_tasks_apart_from_the_model_actors(ray_cluster, corpus, capsys):
    from po_cluster.data.images import Geometry
    from po_cluster.embed.decode import Preprocess
    from po_cluster.embed.inputs import list_inputs
    from po_cluster.embed.job import build_dataset
    from po_cluster.embed.shards import plan_shards

    shards = plan_shards(list_inputs(str(corpus["images"])), SHARD_SIZE, RELEASE, T)
    cfg = _config(corpus, corpus["root"] / "unused")
    build_dataset(shards[:2], cfg, RELEASE, Preprocess(Geometry(64), (0.5,) * 3, (0.5,) * 3), False).explain()
    optimized = capsys.readouterr().out.split("Physical Plan (Optimized)")[-1]  # what runs: planned, not executed
    assert "TaskPoolMapOperator[MapBatches(decode_batch)]" in optimized, optimized
    assert "ActorPoolMapOperator[MapBatches(Embedder)]" in optimized, optimized


def test_rerun_over_the_same_output_writes_nothing(corpus, reference):
    from po_cluster.embed.job import run_embed

    files = sorted((reference["output"] / "embeddings").iterdir())
    stamps = {p.name: p.stat().st_mtime_ns for p in files}
    summary = run_embed(_config(corpus, reference["output"]))
    assert (summary.shards_written, summary.shards_skipped, summary.ok, summary.failed) == (0, 20, 0, 0)
    assert (summary.ok_total, summary.failed_total) == (488, 12)
    assert {p.name: p.stat().st_mtime_ns for p in (reference["output"] / "embeddings").iterdir()} == stamps


def _cli(corpus: dict, output: Path, address: str) -> list[str]:
    return [sys.executable, "-m", "po_cluster.cli", "embed", "--input", str(corpus["images"]), "--output", str(output),
            "--store", str(corpus["store"]), "--release", RELEASE, "--t", str(T), "--shard-size", str(SHARD_SIZE),
            "--batch-size", "32", "--decode-batch-size", "32", "--cache-dir", str(corpus["root"] / "cache"),
            "--address", address]


def _finished(folder: Path) -> dict[str, tuple[int, int]]:
    """Shard files (not temporaries) → (inode, mtime): a file rewritten by the re-run would change."""
    if not folder.is_dir():
        return {}
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir() if not p.name.startswith(".")}


def test_killed_job_resumes_without_redoing_finished_shards(ray_cluster, corpus, reference):
    from po_cluster.embed.job import run_embed

    output = corpus["root"] / "killed"
    folder = output / "embeddings"
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    driver = subprocess.Popen(_cli(corpus, output, ray_cluster), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while driver.poll() is None and time.time() < deadline and not _finished(folder):
        time.sleep(0.01)
    assert driver.poll() is None, "the job ended before it could be killed"
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    finished = _finished(folder)
    print(f"\nkilled with {len(finished)} of 20 shards written")
    assert 0 < len(finished) < 20, finished

    written = []
    summary = run_embed(_config(corpus, output), on_shard=lambda report: written.append(report.uri))
    assert summary.shards_skipped == len(finished) and summary.shards_written == 20 - len(finished)
    assert not {Path(uri).name for uri in written} & set(finished)  # finished shards were not redone
    assert {name: stamp for name, stamp in _finished(folder).items() if name in finished} == finished
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary file left
    for sub in ("embeddings", "errors"):
        resumed, uninterrupted = _read(output, sub), _read(reference["output"], sub)
        assert resumed.column("id").to_pylist() == uninterrupted.column("id").to_pylist()  # each id once
        assert resumed.drop_columns(["embedding"] if sub == "embeddings" else []).equals(
            uninterrupted.drop_columns(["embedding"] if sub == "embeddings" else []))
    np.testing.assert_allclose(np.array(_read(output, "embeddings").column("embedding").to_pylist()),
                               np.array(_read(reference["output"], "embeddings").column("embedding").to_pylist()),
                               atol=1e-6)


def test_cli_on_a_manifest_with_ids(corpus, reference, capsys):
    from po_cluster.cli import main as cli_main

    manifest = corpus["root"] / "subset.jsonl"  # beside the image folder: relative paths resolve against it
    chosen = corpus["good"][:6] + ["bad/text-a.png"]
    manifest.write_text("".join(json.dumps({"id": f"item-{i}", "path": f"images/{name}"}) + "\n"
                                for i, name in enumerate(chosen)))
    output = corpus["root"] / "from-manifest"
    argv = ["embed", "--input", str(manifest), "--output", str(output), "--store", str(corpus["store"]),
            "--release", RELEASE, "--t", str(T), "--shard-size", "4", "--cache-dir", str(corpus["root"] / "cache")]
    assert cli_main(argv) == 0  # joins the session's Ray, which is already initialised
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in printed[:2]] == ["shard 1/2", "shard 2/2"]  # a line per shard
    assert printed[-1].startswith("embed: 6 ok, 1 failed in ") and " images/s); 2 shards written" in printed[-1]
    rows = _read(output, "embeddings")
    assert rows.column("id").to_pylist() == [f"item-{i}" for i in range(6)]
    expected = _read(reference["output"], "embeddings")
    want = dict(zip(expected.column("id").to_pylist(), expected.column("embedding").to_pylist(), strict=True))
    np.testing.assert_allclose(np.array(rows.column("embedding").to_pylist()),
                               np.array([want[name] for name in chosen[:6]]), atol=1e-6)
    assert _read(output, "errors").column("id").to_pylist() == ["item-6"]
    assert cli_main(argv) == 0 and "0 shards written, 2 already done" in capsys.readouterr().out


def test_s3_prefix_in_and_out(corpus, reference, moto_s3, bucket):
    from po_cluster.embed.job import run_embed
    from po_cluster.store.location import StoreConfig, pyarrow_fs

    client = moto_s3.client()
    names = corpus["good"][:10] + ["bad/anim-a.gif", "bad/truncated-a.png"]
    for name in names:
        client.upload_file(str(corpus["images"] / name), bucket, f"in/{name}")
    settings = {"endpoint_url": moto_s3.endpoint_url, "cache_dir": str(corpus["root"] / "cache"), "max_attempts": 2}
    # The session's Ray workers were started before the test's AWS variables: give them to this job's workers.
    aws = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                      "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_EC2_METADATA_DISABLED")}
    cfg = _config(corpus, f"s3://{bucket}/out", input=f"s3://{bucket}/in/", shard_size=8, store_settings=settings)
    summary = run_embed(cfg, runtime_env={"env_vars": aws})
    assert (summary.ok, summary.failed, summary.shards_written) == (10, 2, 2)
    filesystem, path = pyarrow_fs(f"s3://{bucket}/out", StoreConfig(endpoint_url=moto_s3.endpoint_url))
    rows = _read(path, "embeddings", filesystem)
    assert rows.column("id").to_pylist() == sorted(corpus["good"][:10])
    assert rows.column("source_uri").to_pylist()[0] == f"s3://{bucket}/in/{sorted(corpus['good'][:10])[0]}"
    expected = _read(reference["output"], "embeddings")
    want = dict(zip(expected.column("id").to_pylist(), expected.column("embedding").to_pylist(), strict=True))
    np.testing.assert_allclose(np.array(rows.column("embedding").to_pylist()),
                               np.array([want[name] for name in rows.column("id").to_pylist()]), atol=1e-6)
    errors = _read(path, "errors", filesystem)
    assert errors.column("code").to_pylist() == ["unsupported_image_format", "corrupt_image"]
    assert run_embed(cfg, runtime_env={"env_vars": aws}).shards_skipped == 2  # listed on S3: nothing redone


def test_webdataset_shards_give_the_folders_embeddings_and_name_the_bad_member(corpus, reference):
    from po_cluster.embed.job import run_embed
    from wds_helpers import write_shards

    # 3 shards as img2dataset writes them: 4 of the folder's images each, labelled (cls) but for one;
    # shard 1 also holds the folder's truncated PNG.
    shards, names = [[], [], []], {}
    for i, name in enumerate(corpus["good"][:12:2] + corpus["good"][-6:]):  # PNGs and JPEGs
        key, extension = f"{i // 4:05d}{i % 4:04d}", name.rsplit(".", 1)[1]
        sample = {"__key__": key, extension: (corpus["images"] / name).read_bytes()}
        shards[i // 4].append(sample if i == 9 else sample | {"cls": name.split("/")[1]})
        names[f"{i // 4:05d}.tar/{key}.{extension}"] = name
    shards[1].append({"__key__": "000010004", "png": (corpus["images"] / "bad/truncated-a.png").read_bytes(),
                      "cls": "bad"})
    write_shards(corpus["root"] / "wds", shards)
    cfg = _config(corpus, corpus["root"] / "from-shards", input=f"{corpus['root']}/wds/{{00000..00002}}.tar",
                  shard_size=5)
    summary = run_embed(cfg)
    assert (summary.ok, summary.failed, summary.shards_written) == (12, 1, 3)
    rows = _read(corpus["root"] / "from-shards", "embeddings")
    assert rows.column("id").to_pylist() == sorted(names)  # the unlabelled image included: embed needs no label
    assert rows.column("source_uri").to_pylist()[0] == f"{corpus['root']}/wds/{sorted(names)[0]}"
    expected = _read(reference["output"], "embeddings")
    want = dict(zip(expected.column("id").to_pylist(), expected.column("embedding").to_pylist(), strict=True))
    np.testing.assert_allclose(np.array(rows.column("embedding").to_pylist()),
                               np.array([want[names[i]] for i in rows.column("id").to_pylist()]), atol=1e-6)
    errors = _read(corpus["root"] / "from-shards", "errors").to_pylist()
    assert [(e["id"], e["source_uri"], e["code"]) for e in errors] == [
        ("00001.tar/000010004.png", f"{corpus['root']}/wds/00001.tar/000010004.png", BAD_FILES["bad/truncated-a.png"])]
    again = run_embed(cfg)  # what was written stays: the re-run lists the shards and skips every output shard
    assert (again.shards_skipped, again.shards_written, again.ok_total, again.failed_total) == (3, 0, 12, 1)
