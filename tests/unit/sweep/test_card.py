"""The release's model card: every section from the values it is given, nothing invented."""
from po_cluster.sweep.card import release_card

METRICS = {"clean": 1.0, "attacked": 0.845, "word_only": 0.114, "attack_success": 0.016, "kl": 0.002}
RELEASE = {"chosen": "greedy_soup", "top_k": 3, "trials": ["t-a", "t-b", "t-c"], "greedy_members": ["t-a", "t-c"],
           "validation": {"best_trial": {**METRICS, "objective": 0.83}, "greedy_soup": {**METRICS, "objective": 0.84}},
           "test": {"base": {**METRICS, "attacked": 0.0}, "greedy_soup": METRICS},
           "tradeoff": [{"t": 0.0, **METRICS, "attacked": 0.0}, {"t": 1.0, **METRICS}]}
DESCRIPTION = {"architecture": "po-tiny-rn", "pretrained": "po-cluster:typo-shapes-base", "image_tower": "full"}
TRAINING = {"loss": {"loss_type": "dpo", "beta": 0.14, "kl_weight": 1.0}, "optimizer": {"lr": 0.00045},
            "training": {"steps": 150, "seed": 0}, "model": {"image_tower": {"lora": {"rank": 8}}}}


def test_card_has_metrics_curve_settings_and_lineage():
    lineage = {"sweep": "demo-sweep", "experiment": "/runs/sweeps/demo-sweep",
               "tracking": {"uri": "sqlite:////runs/mlflow.db", "run_id": "abc123"}}
    card = release_card(RELEASE, DESCRIPTION, TRAINING, lineage)
    assert card.startswith("# po-cluster release: greedy_soup of po-tiny-rn")
    for section in ("## Metrics (fixed evaluation sets, t = 1)", "## Validation (what chose it)",
                    "## Over t (0: the starting model, 1: this release)", "## Training settings", "## Lineage"):
        assert section in card
    assert "| greedy_soup | 1.000 | 0.845 | 0.114 | 0.016 | 0.002 |" in card
    assert "| 0.000 | 1.000 | 0.000 | 0.114 |" in card  # the t = 0 row of the curve
    assert "| loss.beta | 0.14 |" in card and "| model.image_tower | {'lora': {'rank': 8}} |" in card
    assert "released: **greedy_soup** of t-a, t-c" in card
    assert "MLflow run `abc123` at `sqlite:////runs/mlflow.db`" in card and "demo-sweep" in card


def test_card_without_tracking_or_curve_says_so():
    release = {**RELEASE, "chosen": "best_trial", "tradeoff": []}
    card = release_card(release, DESCRIPTION, {}, {})
    assert "- MLflow: not tracked" in card and "## Over t" not in card
    assert "released: **best_trial** of t-a" in card and "(no training settings recorded)" in card
