"""Accuracies, attack success, KL to the reference, and trade-off curves over t.

Image embeddings (before W) are computed once per set and t. When the image
tower did not train, f does not depend on t and every t costs only the spectral
layer; when it did, each t is one pass of the tower with θ(t) over the sets.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from po_cluster.data import world
from po_cluster.data.records import ImageSet
from po_cluster.losses import kl_ref_policy
from po_cluster.model.aligned import AlignedCLIP, candidate_logprobs

METRIC_KEYS = ("clean", "attacked", "word_only", "own_word", "attack_success", "kl", "retention", "bias_gap",
               "attacked_styles")
RETENTION_PREFIX = "retain_"  # sets of a task the preference data never touches (the world's colour, size)
BIAS_SETS = ("bias_stereotyped", "bias_counter")  # an attribute on images that do / do not follow the stereotype
# Each t is a pass of the image tower over the sets when it trained: the path from the start (0) to
# the release (1) in quarters, and a little on either side.
DEFAULT_TS = (-0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


@torch.no_grad()
def embed_images(model: AlignedCLIP, images: np.ndarray, batch_size: int = 256, t: float = 1.0) -> torch.Tensor:
    """f_t(x) for uint8 images, in batches, L2-normalised, before W."""
    model.eval()
    device = next(model.parameters()).device
    tower = model.tower_at(t)  # θ(t) once, not per batch
    out = [model.encode_image(model.pixels(images[i:i + batch_size], device), t, tower).float().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def embed_prompts(model: AlignedCLIP, prompts: list[str]) -> torch.Tensor:
    device = next(model.parameters()).device
    return model.encode_text(model.tokens(prompts).to(device)).float().cpu()


def shown_keys(rows: list[dict]) -> tuple[str, ...]:
    """The METRIC_KEYS that any of `rows` has, in order: a dataset's sets have no word-only set, and an
    older release's card no own-word one, so a table leaves those columns out instead of blank."""
    return tuple(k for k in METRIC_KEYS if any(k in row for row in rows))


def metric_keys(metrics: dict[str, float]) -> tuple[str, ...]:
    """The keys of `metrics` to show, in order: the headline ones, then each task kept, then the bias sets."""
    detail = sorted(k for k in metrics if k.startswith(RETENTION_PREFIX)) + [k for k in BIAS_SETS if k in metrics]
    return shown_keys([metrics]) + tuple(detail)


def derived_metrics(accuracy: dict[str, float]) -> dict[str, float]:
    """What the sets' accuracies add up to: `retention`, the mean accuracy on the tasks to keep, and
    `bias_gap`, how much better the attribute is named on stereotyped images than on the others."""
    out: dict[str, float] = {}
    kept = [value for name, value in accuracy.items() if name.startswith(RETENTION_PREFIX)]
    if kept:
        out["retention"] = float(np.mean(kept))
    if all(name in accuracy for name in BIAS_SETS):
        out["bias_gap"] = accuracy[BIAS_SETS[0]] - accuracy[BIAS_SETS[1]]
    return out


def set_prompts(sets: dict[str, ImageSet], template: str) -> dict[str, list[str]]:
    """Each set's candidate prompts: a benchmark's every template for every class (class by class), else
    one per class with its own template when it has one (an attribute task), else the task's."""
    return {name: [t.format(c=c) for c in s.classnames for t in s.templates] if s.templates else
            world.prompts(s.classnames, s.template or template) for name, s in sets.items()}


def zero_shot_logits(model: AlignedCLIP, image_emb: torch.Tensor, prompt_emb: torch.Tensor, templates: int,
                     t: float, overrides: dict[int, float] | None = None) -> torch.Tensor:
    """clip_benchmark's zero-shot classifier on the aligned model at t: each class the normalised mean of
    its prompts' normalised embeddings, each W(t)·g as served; logits 100·⟨image, class⟩. At t = 0
    without overrides W is bypassed, as AlignedCLIP.logprobs does: exactly the starting model."""
    def project(emb: torch.Tensor) -> torch.Tensor:
        plain = t == 0 and not overrides
        return torch.nn.functional.normalize(emb, dim=-1) if plain else model.project(emb, t, overrides)

    classes = project(prompt_emb).view(-1, templates, prompt_emb.shape[-1]).mean(dim=1)
    return 100.0 * project(image_emb) @ torch.nn.functional.normalize(classes, dim=-1).T


@dataclass
class Evaluator:
    """Holds one model's embeddings of the evaluation sets and the reference's clean log-probs."""

    model: AlignedCLIP
    sets: dict[str, ImageSet]
    image_emb: dict[str, torch.Tensor]
    text_emb: dict[str, torch.Tensor]  # per set: g(y) of its candidates (sets with the same prompts share one)
    ref_clean_logps: torch.Tensor

    @classmethod
    def build(cls, model: AlignedCLIP, sets: dict[str, ImageSet], template: str = world.PROMPT_TEMPLATE,
              ref_clean_logps: torch.Tensor | None = None) -> Evaluator:
        """`ref_clean_logps` is π_ref on the clean set; without it, π_ref is this model at t = 0,
        which is exactly its starting model (docs/design.md, "The knob t")."""
        prompts = set_prompts(sets, template)
        by_prompts = {key: embed_prompts(model, list(key)) for key in {tuple(p) for p in prompts.values()}}
        text_emb = {name: by_prompts[tuple(p)] for name, p in prompts.items()}
        image_emb = {name: embed_images(model, s.images) for name, s in sets.items()}
        if ref_clean_logps is not None:
            ref = ref_clean_logps
        else:
            clean = embed_images(model, sets["clean"].images, t=0.0) if model.tower_moves_with_t else image_emb["clean"]
            ref = candidate_logprobs(clean, text_emb["clean"], model.logit_scale)
        return cls(model, sets, image_emb, text_emb, ref)

    def with_model(self, model: AlignedCLIP) -> Evaluator:
        """This evaluator for `model`, the same starting model later in training (its weights changed in
        place, or another copy of it). The text tower is never trained, so its embeddings are kept; the
        images are embedded again only when the image tower is trained. π_ref stays the start's."""
        image_emb = self.image_emb if model.image_tower_frozen else \
            {name: embed_images(model, s.images) for name, s in self.sets.items()}
        return Evaluator(model, self.sets, image_emb, self.text_emb, self.ref_clean_logps)

    def embeddings(self, t: float = 1.0) -> dict[str, torch.Tensor]:
        """f_t of every set: those kept at build time unless the tower trained and t ≠ 1."""
        if t == 1.0 or not self.model.tower_moves_with_t:
            return self.image_emb
        return {name: embed_images(self.model, s.images, t=t) for name, s in self.sets.items()}

    @torch.no_grad()
    def metrics(self, t: float = 1.0, overrides: dict[int, float] | None = None) -> dict[str, float]:
        device = next(self.model.spectral.parameters()).device
        out: dict[str, float] = {}
        for name, emb in self.embeddings(t).items():
            image_set = self.sets[name]
            if image_set.templates:  # a zero-shot benchmark, scored as clip_benchmark scores it
                logps = zero_shot_logits(self.model, emb.to(device), self.text_emb[name].to(device),
                                         len(image_set.templates), t, overrides).cpu()
            else:
                logps = self.model.logprobs(emb.to(device), self.text_emb[name].to(device), t, overrides).cpu()
            pred = logps.argmax(-1).numpy()
            out[name] = float(np.mean(pred == image_set.labels))
            if name == "attacked":
                out["attack_success"] = float(np.mean(pred == image_set.written))
            if name == "clean":
                out["kl"] = float(kl_ref_policy(self.ref_clean_logps, logps))
        return {**out, **derived_metrics(out)}

    @torch.no_grad()
    def attacks(self, t: float = 1.0, top: int = 8) -> dict:
        """What still fools the model at t (the world's sets): on `attacked`, the (written word → answer)
        pairs it answered with the word, and its most frequent confusions (shape → wrong answer), most
        frequent first; on `attacked_styles`, the accuracy in each held-out style. Empty parts where the
        sets are not there (a dataset's)."""
        out: dict = {}
        preds = {name: self._predictions(name, t) for name in ("attacked", "attacked_styles") if name in self.sets}
        if "attacked" in preds:
            s, pred = self.sets["attacked"], preds["attacked"]
            names = s.classnames
            fooled = pred == s.written
            out["attacked"] = {"images": len(s), "fooled": int(fooled.sum()),
                               "words": _top_pairs(s.written[fooled], pred[fooled], names, top),
                               "confusions": _top_pairs(s.labels[pred != s.labels], pred[pred != s.labels], names, top)}
        if "attacked_styles" in preds:
            from po_cluster.data.world import STYLES, row_style

            s, pred = self.sets["attacked_styles"], preds["attacked_styles"]
            styles = np.array([row_style(i) for i in range(len(s))])
            out["styles"] = {style: float(np.mean(pred[styles == style] == s.labels[styles == style]))
                             for style in STYLES}
        return out

    def _predictions(self, name: str, t: float) -> np.ndarray:
        device = next(self.model.spectral.parameters()).device
        emb = self.image_emb[name] if t == 1.0 or not self.model.tower_moves_with_t else \
            embed_images(self.model, self.sets[name].images, t=t)
        logps = self.model.logprobs(emb.to(device), self.text_emb[name].to(device), t)
        return logps.argmax(-1).cpu().numpy()

    def tradeoff(self, ts: tuple[float, ...] = DEFAULT_TS) -> list[dict[str, float]]:
        return [{"t": t, **self.metrics(t)} for t in ts]


def _top_pairs(first: np.ndarray, second: np.ndarray, names: tuple[str, ...], top: int) -> list[dict]:
    """The `top` most frequent (first, second) class pairs, as {"from", "to", "count"}, ties by index."""
    pairs, counts = np.unique(np.stack([first, second], axis=1), axis=0, return_counts=True) if len(first) else \
        (np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.int64))
    order = np.argsort(-counts, kind="stable")[:top]
    return [{"from": names[int(pairs[i, 0])], "to": names[int(pairs[i, 1])], "count": int(counts[i])} for i in order]


def plot_tradeoff(rows: list[dict[str, float]], path: str, title: str = "trade-off over t") -> None:
    """Accuracies against t as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = [row["t"] for row in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("clean", "clean"), ("attacked", "attacked"), ("word_only", "word-only (OCR)"),
                       ("own_word", "own word (shape + its name)"),
                       ("attack_success", "attack success"), ("retention", "retention (colour, size)"),
                       ("bias_gap", "bias gap")):
        if all(key in row for row in rows):  # a dataset's sets have no word-only, retention or bias sets
            ax.plot(ts, [row[key] for row in rows], marker="o", label=label)
    ax.axvline(0, color="grey", lw=0.8, ls=":")
    ax.axvline(1, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="t  (θ_ref + t·(θ − θ_ref), σ_i^t)", ylabel="accuracy", ylim=(0, 1.02), title=title)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(rows: list[dict], columns: tuple[str, ...]) -> str:
    """A plain Markdown table."""
    def cell(value) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
