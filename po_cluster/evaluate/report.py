"""`po-cluster report`: a Markdown and an HTML report of a sweep, with PNG plots."""
from __future__ import annotations

import html
from pathlib import Path

from po_cluster.evaluate.metrics import METRIC_KEYS, format_table, plot_tradeoff

MARKERS = {"dpo": "o", "ipo": "s", "kto": "^", "ce": "x"}
TRIAL_COLUMNS = ("trial", "loss", "beta", "kl_weight", "lr", "image_tower", "val_clean", "val_attacked",
                 "val_word_only", "val_kl", "objective", "step")


def trial_rows(records: list[dict]) -> list[dict]:
    rows: list[dict] = []
    for r in records:
        m, c = r.get("metrics", {}), r.get("config", {})
        rows.append({"trial": r.get("trial_id"), "loss": c.get("loss_type"), "beta": c.get("beta"),
                     "kl_weight": c.get("kl_weight"), "lr": c.get("lr", ""), "image_tower": c.get("image_tower", ""),
                     **{k: m.get(k) for k in TRIAL_COLUMNS[6:] if k in m},
                     "error": r.get("error") or ""})
    return sorted(rows, key=_objective_or_last, reverse=True)


def _objective_or_last(row: dict) -> float:
    """A row's objective; a trial without one (failed before reporting) sorts last."""
    objective = row.get("objective")
    return -1e9 if objective is None else objective


def best_per(rows: list[dict], column: str = "loss") -> list[dict]:
    """The best row of each value of `column` (a loss, an image tower mode)."""
    best: dict[str, dict] = {}
    for row in rows:  # rows are sorted best first
        if row.get("objective") is not None:
            best.setdefault(str(row.get(column)), row)
    return list(best.values())


def plot_beta_lambda(rows: list[dict], path: Path) -> None:
    """β against λ (both log), coloured by the objective, one marker per loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    scored = [r for r in rows if r.get("objective") is not None]
    low = min((r["objective"] for r in scored), default=0.0)
    high = max((r["objective"] for r in scored), default=1.0)
    for offset, (loss, marker) in enumerate(MARKERS.items()):
        mine = [r for r in scored if r["loss"] == loss]
        if mine:  # losses dodged a little along β, so trials at the same point stay visible
            dodge = 1.06 ** (offset - 1.5)
            points = ax.scatter([r["beta"] * dodge for r in mine], [r["kl_weight"] for r in mine],
                                c=[r["objective"] for r in mine], vmin=low, vmax=high, cmap="viridis",
                                marker=marker, s=80, label=loss, edgecolors="black")
    if scored:
        fig.colorbar(points, ax=ax, label="objective (validation)")
    ax.set(xscale="log", yscale="log", xlabel="β", ylabel="λ (kl_weight)", title="trials: β–λ map")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def write_report(records: list[dict], average: dict | None, out_dir: str | Path, title: str) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(records)
    plot_beta_lambda(rows, out / "beta_lambda.png")
    sections = [f"# {title}", "", f"{len(rows)} trials.", "", "## All trials (best first)", "",
                format_table([{k: _fmt(v) for k, v in r.items()} for r in rows], TRIAL_COLUMNS), "",
                "![β–λ map](beta_lambda.png)", "", "## Best trial per loss", "",
                format_table([{k: _fmt(v) for k, v in r.items()} for r in best_per(rows)], TRIAL_COLUMNS)]
    if len({r.get("image_tower") for r in rows}) > 1:  # the sweep searched the mode: compare them
        sections += ["", "## Best trial per image tower mode", "",
                     format_table([{k: _fmt(v) for k, v in r.items()} for r in best_per(rows, "image_tower")],
                                  TRIAL_COLUMNS)]
    if average:
        plot_tradeoff(average["tradeoff"], str(out / "tradeoff.png"), f"over t: release ({average['chosen']})")
        test_rows = [{"model": name, **metrics} for name, metrics in average["test"].items()]
        sections += ["", "## Base vs best trial vs soups (fixed evaluation sets, t = 1)", "",
                     format_table(test_rows, ("model",) + METRIC_KEYS), "",
                     f"Release: **{average['chosen']}** (chosen on validation), greedy soup members: "
                     f"{', '.join(average['greedy_members'])}.", "", "## The release over t (0: its start)", "",
                     format_table(average["tradeoff"], ("t",) + METRIC_KEYS), "", "![trade-off](tradeoff.png)"]
    markdown = "\n".join(sections) + "\n"
    (out / "report.md").write_text(markdown)
    (out / "report.html").write_text(_html(markdown, title))
    return out / "report.md", out / "report.html"


def _html(markdown: str, title: str) -> str:
    """A small Markdown subset (headings, tables, images, paragraphs) to HTML, no extra dependency."""
    body, in_table = [], False
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            tag = "th" if not in_table else "td"
            body.append(("<table>" if not in_table else "") + "<tr>" +
                        "".join(f"<{tag}>{html.escape(c).replace('**', '')}</{tag}>" for c in cells) + "</tr>")
            in_table = True
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('# '))}</h{level}>")
        elif line.startswith("!["):
            alt, src = line[2:].split("](")
            body.append(f'<img alt="{html.escape(alt)}" src="{html.escape(src.rstrip(")"))}">')
        elif line:
            body.append(f"<p>{html.escape(line).replace('**', '')}</p>")
    if in_table:
        body.append("</table>")
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>" \
           f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
