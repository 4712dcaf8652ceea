"""The OpenAPI document against the server: schemathesis (its CLI, every check) on the Serve app on 127.0.0.1.

Valid requests by the document must be answered (2xx, or 404 for a release that does not exist), invalid
ones refused with a 4xx, every status and header must be the documented ones, and schemathesis's warnings
("mostly rejected generated data", …) fail the run too. Bounded: a fixed seed and --max-examples.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
HERE = Path(__file__).resolve().parent
KEY = "schema-key-41d0"
LIMITS = {"max_body_bytes": 1 << 20, "max_image_pixels": 1_000_000, "max_inputs": 8, "max_labels": 16,
          "max_text_chars": 200}
MAX_EXAMPLES = 150


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from po_cluster.serving.local import publish_example_release, start_local
    from po_cluster.store.artifacts import open_store

    root = tmp_path_factory.mktemp("schema")
    publish_example_release(str(root / "store"), "r-main", str(root / "checkpoints"), seed=0)
    (root / "keys").write_text(f"{KEY}\n")
    manifest = open_store(str(root / "store")).show_release("r-main")
    args = {"store": str(root / "store"), "store_settings": {"cache_dir": str(root / "cache")}, "limits": LIMITS,
            "batching": {"max_batch_size": 8}, "model": {"num_cpus": 0, "torch_threads": 1},
            "gateway": {"num_cpus": 0}, "auth": {"api_keys_file": str(root / "keys")}}
    server = start_local(args, num_cpus=2)
    yield server, manifest, root
    server.stop()


def test_schemathesis_all_checks_no_failures_no_warnings(served):
    server, manifest, root = served
    config = root / "schemathesis.toml"
    config.write_text("[warnings]\nfail-on = true\n")
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks", "SCHEMA_DIM": str(manifest["model"]["embed_dim"]),
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "--no-color", "run",
         f"{server.url}/openapi.json", "--checks", "all", "--max-examples", str(MAX_EXAMPLES), "--seed", "7",
         "--workers", "1", "--header", f"Authorization: Bearer {KEY}", "--request-timeout", "30",
         "--report", "junit", "--report-dir", str(root / "report")],
        env=env, cwd=root, capture_output=True, text=True, timeout=600)
    print(run.stdout[-4000:])
    assert run.returncode == 0, run.stdout[-12000:] + run.stderr[-3000:]
    assert "No issues found" in run.stdout and "mostly rejected" not in run.stdout
