"""The core's promise on the shipped base model, single process (configs/compare.yaml):
dpo, ipo, kto and the word-free anchor each raise attacked accuracy by ≥ 0.30 and keep clean accuracy
and retention (the colour and size tasks the preference data never touches) within 0.02; the anchor
also ignores the word rather than avoiding it (own-word as attacked, word-only near chance)."""
import pytest

from po_cluster.config import CompareConfig, load_config
from po_cluster.train.run import train

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "kto", "anchor"])
def test_po_loss_fixes_typographic_attacks_without_forgetting(loss_type, tmp_path):
    cfg = load_config("configs/compare.yaml", CompareConfig).run_for(loss_type)
    result = train(cfg.model_copy(update={"output_dir": str(tmp_path)}))
    assert result.after["attacked"] >= result.before["attacked"] + 0.30, result.after
    assert result.after["clean"] >= result.before["clean"] - 0.02, result.after
    assert result.after["retention"] >= result.before["retention"] - 0.02, result.after
    if loss_type == "anchor":
        assert result.after["own_word"] >= result.after["attacked"] - 0.03, result.after
        assert result.after["word_only"] <= 0.15, result.after
