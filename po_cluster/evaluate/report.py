"""`po-cluster report`: a Markdown and an HTML report of a sweep, with PNG plots."""
from __future__ import annotations

import html
from pathlib import Path

from po_cluster.evaluate.metrics import format_table, plot_tradeoff, shown_keys
from po_cluster.train.phases import PHASE_KEYS, STARTED_KEY, TRIAL_KEY

MARKERS = {"dpo": "o", "ipo": "s", "kto": "^", "ce": "x", "anchor": "D"}
TRIAL_COLUMNS = ("trial", "loss", "beta", "kl_weight", "lr", "image_tower", "val_clean", "val_attacked",
                 "val_word_only", "val_own_word", "val_retention", "val_kl", "val_bias_gap", "objective", "step")


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


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def peak_overlap(spans: list[tuple[float, float]]) -> int:
    """The most trials running at once, from their (start, end) wall times."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = peak = 0
    for _, change in events:  # an end sorts before a start at the same instant
        running += change
        peak = max(peak, running)
    return peak


def time_breakdown(records: list[dict], wall_seconds: float | None = None, slots: int | None = None) -> dict:
    """Where the trials' time went: per phase, the sum over the trials that report `time_trial` and
    its share of their total; `other` is what no phase covers (Ray Tune and Train's bookkeeping,
    reports, resuming). Efficiency is Σ time_train_steps ÷ (wall_seconds × slots); without
    `wall_seconds` the sweep's span is taken from the trials' starts and ends (leaving out the sweep
    driver's own start and end), without `slots` the most trials that ran at once (a floor on the
    slots, so the efficiency is then a ceiling). None when neither is known."""
    timed = [r.get("metrics", {}) for r in records if _number(r.get("metrics", {}).get(TRIAL_KEY))]
    total = sum(m[TRIAL_KEY] for m in timed)
    phases = {key.removeprefix("time_"): sum(m[key] for m in timed if _number(m.get(key))) for key in PHASE_KEYS}
    phases["other"] = max(0.0, total - sum(phases.values()))
    spans = [(m[STARTED_KEY], m[STARTED_KEY] + m[TRIAL_KEY]) for m in timed if _number(m.get(STARTED_KEY))]
    if wall_seconds is None and spans and len(spans) == len(timed):
        wall_seconds = max(end for _, end in spans) - min(start for start, _ in spans)
    if slots is None and spans:
        slots = peak_overlap(spans)
    efficiency = phases["train_steps"] / (wall_seconds * slots) if wall_seconds and slots else None
    return {"trials": len(timed), "total_seconds": total, "seconds": phases,
            "share": {k: (v / total if total else None) for k, v in phases.items()},
            "wall_seconds": wall_seconds, "slots": slots, "efficiency": efficiency}


def breakdown_section(breakdown: dict) -> list[str]:
    """The report's "Where the trials' time went" (Markdown lines); none when no trial was timed."""
    if not breakdown["trials"]:
        return []
    rows = [{"phase": name, "seconds": f"{seconds:.1f}", "share": f"{breakdown['share'][name]:.1%}"
             if breakdown["share"][name] is not None else ""} for name, seconds in breakdown["seconds"].items()]
    rows.append({"phase": "trial (total)", "seconds": f"{breakdown['total_seconds']:.1f}", "share": "100%"})
    lines = ["", "## Where the trials' time went", "",
             f"Summed over {breakdown['trials']} trials; other = time_trial − the phases (Ray Tune and Train, "
             "reports, resuming).", "", format_table(rows, ("phase", "seconds", "share"))]
    if breakdown["efficiency"] is not None:
        lines += ["", f"Sweep efficiency (Σ training steps ÷ (wall {breakdown['wall_seconds']:.0f} s × "
                      f"{breakdown['slots']} trial slots)): **{breakdown['efficiency']:.1%}**."]
    return lines


def plot_beta_lambda(rows: list[dict], path: Path) -> None:
    """β against λ (both log), coloured by the objective, one marker per loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    scored = [r for r in rows if r.get("objective") is not None]
    low = min((r["objective"] for r in scored), default=0.0)
    high = max((r["objective"] for r in scored), default=1.0)
    points = None
    for offset, loss in enumerate(dict.fromkeys([*MARKERS, *(str(r["loss"]) for r in scored)])):
        mine = [r for r in scored if r["loss"] == loss]
        if mine:  # losses dodged a little along β, so trials at the same point stay visible
            dodge = 1.06 ** (offset - 1.5)
            points = ax.scatter([r["beta"] * dodge for r in mine], [r["kl_weight"] for r in mine],
                                c=[r["objective"] for r in mine], vmin=low, vmax=high, cmap="viridis",
                                marker=MARKERS.get(loss, "*"), s=80, label=loss, edgecolors="black")
    if points is not None:
        fig.colorbar(points, ax=ax, label="objective (validation)")
    ax.set(xscale="log", yscale="log", xlabel="β", ylabel="λ (kl_weight)", title="trials: β–λ map")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def write_report(records: list[dict], average: dict | None, out_dir: str | Path, title: str,
                 slots: int | None = None) -> tuple[Path, Path]:
    """`slots`: the sweep's concurrent trials, for its efficiency (else the most that ran at once)."""
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
                     format_table(test_rows, ("model",) + shown_keys(test_rows)), "",
                     f"Release: **{average['chosen']}** (chosen on validation), greedy soup members: "
                     f"{', '.join(average['greedy_members'])}.", "", "## The release over t (0: its start)", "",
                     format_table(average["tradeoff"], ("t",) + shown_keys(average["tradeoff"])), "",
                     "![trade-off](tradeoff.png)"]
        sections += attacks_section(average.get("attacks") or {})
    sections += breakdown_section(time_breakdown(records, slots=slots))
    markdown = "\n".join(sections) + "\n"
    (out / "report.md").write_text(markdown)
    (out / "report.html").write_text(_html(markdown, title))
    return out / "report.md", out / "report.html"


def attacks_section(attacks: dict) -> list[str]:
    """The report's "Attacks that still work on the release" (Markdown lines): the written words it
    still answers, its most frequent confusions, and its accuracy per held-out writing style."""
    lines: list[str] = []
    if "attacked" in attacks:
        a = attacks["attacked"]
        lines += ["", "## Attacks that still work on the release (t = 1)", "",
                  f"{a['fooled']} of {a['images']} attacked test images are answered with the written word.", "",
                  format_table([{"written word": p["from"], "answered": p["to"], "images": p["count"]}
                                for p in a["words"]], ("written word", "answered", "images")), "",
                  "Most frequent confusions (any wrong answer):", "",
                  format_table([{"shape": p["from"], "answered": p["to"], "images": p["count"]}
                                for p in a["confusions"]], ("shape", "answered", "images"))]
    if "styles" in attacks:
        lines += ["", "Attacked accuracy per held-out writing style (styles training never renders):", "",
                  format_table([{"style": k, "attacked": v} for k, v in attacks["styles"].items()],
                               ("style", "attacked"))]
    return lines


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
