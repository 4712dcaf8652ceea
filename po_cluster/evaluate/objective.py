"""The number a sweep maximises: the accuracy on the hard case, less what the run lost on the easy
one. Trials report it, the searcher and the scheduler rank them by it, and `average` chooses the
release candidate by it."""
from __future__ import annotations

from dataclasses import dataclass, field

from po_cluster.config import DataConfig, ObjectiveConfig

# What a run is chosen for, per world task: the accuracy on the hard case (the attacked images; the
# attribute on images that break the stereotype).
TASK_TARGETS = {"typographic": "attacked", "bias": "bias_counter"}


@dataclass(frozen=True)
class Objective:
    """The validation objective: the target accuracy, minus `clean_penalty` (`retention_penalty`) times
    the clean accuracy (the retention) lost beyond `clean_tolerance`. Retention counts only where the
    sets have tasks to keep (the world's, not a dataset's). Where they have shapes with their own name
    written (`own_word`), the typographic target is the worse of attacked and own-word accuracy: a
    model that reads the word fails the first, one that avoids it the second, and only one that ignores
    it scores on both (docs/design.md, "Ignoring the word, not avoiding it")."""

    target: str = "attacked"
    weights: ObjectiveConfig = field(default_factory=ObjectiveConfig)

    @classmethod
    def of(cls, weights: ObjectiveConfig, data: DataConfig) -> Objective:
        return cls(TASK_TARGETS[data.task], weights)

    def score(self, metrics: dict[str, float], base: dict[str, float]) -> float:
        w = self.weights
        tolerance = w.clean_tolerance
        target = metrics[self.target]
        if self.target == "attacked" and "own_word" in metrics:
            target = min(target, metrics["own_word"])
        score = target - w.clean_penalty * max(0.0, base["clean"] - metrics["clean"] - tolerance)
        if "retention" in metrics and "retention" in base:
            score -= w.retention_penalty * max(0.0, base["retention"] - metrics["retention"] - tolerance)
        return score
