"""`po-cluster average`: the top-k trials of a sweep combined as a uniform and a
greedy soup, the best of (best trial, soups) chosen on the validation sets,
reported on the fixed evaluation sets, and written as a release folder.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file

from po_cluster.config import DataConfig, ModelConfig
from po_cluster.data.selection import held_out_sets, prompt_template
from po_cluster.evaluate.metrics import Evaluator
from po_cluster.evaluate.objective import Objective
from po_cluster.model.aligned import AlignedCLIP
from po_cluster.model.checkpoint import (
    MODEL_JSON,
    TRAINING_JSON,
    WEIGHTS,
    CheckpointError,
    image_tower_mode,
    load_trained_state,
    read_json,
    recorded_preprocess,
    save_checkpoint,
    verify_manifest,
    write_manifest,
)
from po_cluster.model.loading import load_clip
from po_cluster.sweep.card import release_card
from po_cluster.sweep.soup import greedy_soup, uniform_soup

if TYPE_CHECKING:  # the driver imports Tune and Optuna, which averaging does not need
    from po_cluster.sweep.driver import TrialRecord


@dataclass
class Candidate:
    name: str
    state: dict[str, torch.Tensor]
    description: dict
    training: dict


def read_candidate(name: str, folder: str | Path) -> Candidate:
    """A trial's checkpoint, verified against its manifest before anything is read."""
    folder = Path(folder)
    verify_manifest(folder)
    return Candidate(name, load_file(str(folder / WEIGHTS)), read_json(folder, MODEL_JSON),
                     read_json(folder, TRAINING_JSON))


def check_same_architecture(candidates: list[Candidate]) -> None:
    """Soups only make sense between checkpoints of one architecture from one start."""
    first = candidates[0]
    for other in candidates[1:]:
        for key in ("architecture", "pretrained", "embed_dim", "image_tower", "preprocess"):
            if other.description.get(key) != first.description.get(key):
                raise CheckpointError(
                    f"cannot average {first.name} ({key}={first.description.get(key)}) with "
                    f"{other.name} ({key}={other.description.get(key)})")


class Scorer:
    """Evaluates weights of one architecture on validation and test sets against the base model."""

    def __init__(self, description: dict, data: DataConfig, objective: Objective) -> None:
        cfg = ModelConfig(name=description["architecture"], pretrained=description.get("pretrained"),
                          preprocess=recorded_preprocess(description, "a candidate"))
        self.base = AlignedCLIP(load_clip(cfg), "frozen")
        # Built from the base's weights in the trials' mode, so its θ_ref (what t = 0 serves) is the
        # start every trial shared; the states scored and released are then loaded into it.
        self.model = AlignedCLIP(load_clip(cfg), image_tower_mode(description))
        # Soups are chosen on val and the release scored on test: neither is what the trials trained on.
        geometry = self.base.preprocess.geometry
        self.val_sets, self.test_sets = held_out_sets(data, "val", geometry), held_out_sets(data, "test", geometry)
        self.template = prompt_template(data)
        # Every candidate is scored as the base's evaluator continued with its weights (`with_model`):
        # π_ref is the base's, and a frozen tower's image embeddings are the base's, computed once.
        self._val = Evaluator.build(self.base, self.val_sets, self.template)
        self._test = Evaluator.build(self.base, self.test_sets, self.template)
        self.base_val, self.base_test = self._val.metrics(0.0), self._test.metrics(0.0)
        self.objective = objective
        self._validated: dict[str, dict[str, float]] = {}

    def _load(self, state: dict[str, torch.Tensor]) -> AlignedCLIP:
        load_trained_state(self.model, state, "a candidate's weights")
        return self.model

    def validation(self, state: dict[str, torch.Tensor]) -> dict[str, float]:
        """Validation metrics and objective; remembered by content, since the greedy soup scores states
        (a one-member soup is the best trial, bit for bit) that the final choice scores again."""
        key = _fingerprint(state)
        if key not in self._validated:
            metrics = self._val.with_model(self._load(state)).metrics(1.0)
            self._validated[key] = {**metrics, "objective": self.objective.score(metrics, self.base_val)}
        return dict(self._validated[key])

    def test(self, state: dict[str, torch.Tensor]) -> Evaluator:
        return self._test.with_model(self._load(state))


def _fingerprint(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        digest.update(name.encode())
        # numpy's stubs declare ndarray's buffer protocol (__buffer__) only for Python >= 3.12.
        digest.update(state[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
    return digest.hexdigest()


def ranked_trials(records: Sequence[TrialRecord]) -> list[TrialRecord]:
    """Finished trials with a checkpoint, best validation objective first."""
    usable = [r for r in records if r.checkpoint_path and r.objective is not None]
    return sorted(usable, key=lambda r: -math.inf if r.objective is None else r.objective, reverse=True)


def soup_candidates(records: Sequence[TrialRecord], top_k: int) -> list[TrialRecord]:
    """The top-k trials that can be averaged together. Soups average weights of one shape and one
    start: when the sweep searched the image tower mode, they come from the best trial's mode."""
    ranked = ranked_trials(records)
    if not ranked:
        raise ValueError("no finished trial with a checkpoint to average")
    mode = ranked[0].config.get("image_tower")
    return [r for r in ranked if r.config.get("image_tower") == mode][:top_k]


@dataclass(frozen=True)
class AverageResult:
    """The release candidate chosen among the best trial and the soups, and where it went."""

    chosen: str  # "best_trial", "uniform_soup" or "greedy_soup"
    release_folder: Path
    top_k: int  # trials actually combined (fewer than asked when fewer finished)
    trials: tuple[str, ...]  # their ids, best first
    greedy_members: tuple[str, ...]
    validation: dict[str, dict[str, float]]  # candidate → validation metrics and objective
    test: dict[str, dict[str, float]]  # "base" and each candidate → fixed evaluation sets, t = 1
    tradeoff: tuple[dict[str, float], ...] = field(default=())  # the chosen candidate over t
    attacks: dict = field(default_factory=dict)  # what still fools the chosen candidate (Evaluator.attacks)
    release_id: str | None = None  # set once published
    store: str | None = None  # where it was published

    @property
    def metrics(self) -> dict[str, float]:
        """The chosen candidate on the fixed evaluation sets at t = 1."""
        return self.test[self.chosen]

    def to_json(self) -> dict:
        """The content of average.json (what `report` reads)."""
        return {"chosen": self.chosen, "top_k": self.top_k, "trials": list(self.trials),
                "greedy_members": list(self.greedy_members), "validation": self.validation, "test": self.test,
                "tradeoff": list(self.tradeoff), "attacks": self.attacks,
                "release_folder": str(self.release_folder)}


def _candidate(record: TrialRecord, locate: Callable[[str], Path]) -> Candidate:
    """A ranked trial's checkpoint; a soup's members are named by their trial ids."""
    if record.trial_id is None or record.checkpoint_path is None:
        raise ValueError(f"trial {record.trial_id!r} has no id or no checkpoint to average")
    return read_candidate(record.trial_id, locate(record.checkpoint_path))


def average_trials(records: Sequence[TrialRecord], top_k: int, out_dir: str | Path, data: DataConfig,
                   objective: Objective | None = None,
                   locate: Callable[[str], Path] = Path, lineage: dict | None = None,
                   comparators: dict[str, dict[str, float]] | None = None) -> AverageResult:
    """Soups of the top-k trials; writes `out_dir/release` (manifest last) and `out_dir/average.json`.

    `locate` turns a trial's checkpoint path into a local folder (a download, for S3); `lineage` (the
    sweep, its experiment, its MLflow run) goes into the release's model.json and card. `comparators`:
    other models' metrics on the same test sets (a head ablation), shown after the base.
    """
    top = soup_candidates(records, top_k)
    candidates = [_candidate(r, locate) for r in top]
    check_same_architecture(candidates)
    scorer = Scorer(candidates[0].description, data, objective or Objective())
    states = {"best_trial": candidates[0].state, "uniform_soup": uniform_soup([c.state for c in candidates])}
    states["greedy_soup"], members = greedy_soup([(c.name, c.state) for c in candidates],
                                                 lambda s: scorer.validation(s)["objective"])
    validation = {name: scorer.validation(state) for name, state in states.items()}
    chosen = max(states, key=lambda name: validation[name]["objective"])
    test, tradeoff, attacks = {"base": scorer.base_test, **(comparators or {})}, [], {}
    for name, state in states.items():
        evaluator = scorer.test(state)  # valid while this state is the one loaded in the scorer's model
        test[name] = evaluator.metrics(1.0)
        if name == chosen:
            tradeoff, attacks = evaluator.tradeoff(), evaluator.attacks()
    release = {"chosen": chosen, "top_k": len(candidates), "trials": [c.name for c in candidates],
               "greedy_members": members, "validation": validation, "test": test, "tradeoff": tradeoff,
               "attacks": attacks}
    folder = _write_release(Path(out_dir) / "release", scorer, states[chosen], candidates[0], release,
                            lineage or {})
    result = AverageResult(chosen, folder, len(candidates), tuple(c.name for c in candidates), tuple(members),
                           validation, test, tuple(tradeoff), attacks=attacks)
    (Path(out_dir) / "average.json").write_text(json.dumps(result.to_json(), indent=2))
    return result


def _write_release(folder: Path, scorer: Scorer, state: dict, source: Candidate, release: dict,
                   lineage: dict) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    model = scorer._load(state)
    description = {**source.description, "source": release["chosen"], "members": release["greedy_members"]
                   if release["chosen"] == "greedy_soup" else release["trials"][:1], "lineage": lineage}
    if release["chosen"] == "uniform_soup":
        description["members"] = release["trials"]
    metrics = {"test": release["test"][release["chosen"]], "validation": release["validation"][release["chosen"]],
               "base_test": release["test"]["base"]}
    save_checkpoint(folder, model, description, source.training, metrics)
    (folder / "card.md").write_text(release_card(release, description, source.training, lineage))
    write_manifest(folder)  # again, last: the card is part of the release
    return folder
