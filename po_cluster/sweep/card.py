"""The release's model card (card.md, part of the release): what it is, how well it does, how it
was made and where it came from, readable without po-cluster. `releases show` prints it."""
from __future__ import annotations

from po_cluster.evaluate.metrics import format_table, shown_keys

# The training settings a reader needs to reproduce or judge a release, as (section, key) of training.json.
SETTINGS = (("model", "name"), ("model", "pretrained"), ("model", "image_tower"), ("loss", "loss_type"),
            ("loss", "beta"), ("loss", "kl_weight"), ("loss", "anchor_weight"), ("loss", "anchor_space"),
            ("optimizer", "lr"), ("optimizer", "spectral_lr"),
            ("training", "steps"), ("training", "batch_size"), ("training", "bma"), ("training", "seed"),
            ("data", "dataset"), ("data", "n_pairs"), ("data", "n_reg"))


def _settings(training: dict) -> str:
    rows = []
    for section, key in SETTINGS:
        value = (training.get(section) or {}).get(key)
        if value is not None:
            rows.append({"setting": f"{section}.{key}", "value": value if isinstance(value, str) else repr(value)})
    return format_table(rows, ("setting", "value")) if rows else "(no training settings recorded)"


def _lineage(release: dict, lineage: dict) -> list[str]:
    members = release["greedy_members"] if release["chosen"] == "greedy_soup" else \
        release["trials"] if release["chosen"] == "uniform_soup" else release["trials"][:1]
    lines = [f"- sweep: `{lineage.get('sweep', '?')}` ({lineage.get('experiment', 'experiment folder unknown')})",
             f"- candidates: the top {release['top_k']} trials, best first: {', '.join(release['trials'])}",
             f"- released: **{release['chosen']}** of {', '.join(members)}"]
    tracking = lineage.get("tracking") or {}
    if tracking.get("run_id"):
        lines.append(f"- MLflow run `{tracking['run_id']}` at `{tracking.get('uri', '?')}` "
                     f"(`mlflow ui --backend-store-uri {tracking.get('uri', '?')}`)")
    else:
        lines.append("- MLflow: not tracked")
    return lines


def release_card(release: dict, description: dict, training: dict, lineage: dict) -> str:
    """Markdown: metrics (test sets, held out from every choice, and validation), the trade-off over
    t, the training settings of the source trial, and lineage."""
    test = [{"model": name, **metrics} for name, metrics in release["test"].items()]
    validation = [{"model": name, **metrics} for name, metrics in release["validation"].items()]
    sections = [
        f"# po-cluster release: {release['chosen']} of {description.get('architecture', '?')}", "",
        f"An aligned {description.get('architecture', '?')} (image tower `{description.get('image_tower')}`) "
        f"trained from `{description.get('pretrained')}` by preference optimization against typographic attacks. "
        "Serve it with `po-cluster serve`; every request's t goes from the starting model (0) to this "
        "release (1).", "",
        "## Metrics (fixed evaluation sets, t = 1)", "",
        "Held out from every choice: the release was chosen on the validation sets below.", "",
        format_table(test, ("model",) + shown_keys(test)), "",
        "## Validation (what chose it)", "",
        format_table(validation, ("model",) + shown_keys(validation) + ("objective",)), ""]
    if release.get("tradeoff"):
        sections += ["## Over t (0: the starting model, 1: this release)", "",
                     format_table(list(release["tradeoff"]), ("t",) + shown_keys(list(release["tradeoff"]))), ""]
    sections += ["## Training settings (of the best trial)", "", _settings(training), "",
                 "## Lineage", "", *_lineage(release, lineage), ""]
    return "\n".join(sections)
