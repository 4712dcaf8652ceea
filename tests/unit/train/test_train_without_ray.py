"""The training library is plain torch: with Ray unimportable, `po_cluster.train` imports and trains
the shipped world config through its one entry (po_cluster/train/run.py), reports included."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

PROBE = """
import json, sys
sys.modules["ray"] = None  # `import ray` (and any ray.*) now raises ImportError
import po_cluster.train
from po_cluster.config import ReportingConfig, TrainJobConfig, load_yaml, parse_config
from po_cluster.data import world
from po_cluster.train.run import train
from po_cluster.train.session import LocalSession

data = load_yaml(sys.argv[1])
data["output_dir"] = sys.argv[2]
data["data"] = {**data.get("data", {}), "n_pairs": 32, "n_reg": 16, "n_val": 10}
data["training"] = {**data["training"], "steps": 4, "batch_size": 8, "reg_batch_size": 8}
run = parse_config(data)
session = LocalSession.for_run(run, test_sets=world.validation_sets(10))
result = train(TrainJobConfig(run=run, reporting=ReportingConfig(report_every=2, checkpoint_every=4)), session)
print(json.dumps({"tower": run.model.image_tower, "checkpoint": str(result.checkpoint),
                  "steps": [r["step"] for r in session.reports], "objective": "objective" in session.reports[-1],
                  "before": sorted(result.before), "ray": [m for m in sys.modules if m.split(".")[0] == "ray"
                                                           and sys.modules[m] is not None]}))
"""


def test_the_training_library_trains_without_ray(tmp_path):
    config = ROOT / "configs" / "demo-spectral.yaml"  # the world, a frozen tower: the fastest shipped run
    out = subprocess.run([sys.executable, "-c", PROBE, str(config), str(tmp_path)], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["tower"] == "frozen" and found["ray"] == []
    assert found["steps"] == [2, 4] and found["objective"]  # reported to the local session, validated
    assert "clean" in found["before"]  # the test sets scored before training
    checkpoint = Path(found["checkpoint"])
    assert checkpoint == tmp_path / "demo-spectral"
    assert set(json.loads((checkpoint / "metrics.json").read_text())) >= {"before", "after", "last_iterate"}
