"""What every trial of a sweep computes the same way before its first step, computed once per sweep.

Trials differ only in the loss, β, λ, the learning rate and (when searched) the image tower mode;
they start from the same model and read the same records. So the decoded records, the prompt
embeddings g(y), π_ref's log-probabilities, the starting model's image embeddings f(x) of the
training, regularisation and validation images, and the base model's validation metrics are the
same in every trial. One Ray task computes them (po_cluster/cluster/shared.py) and the sweep hands
them to every trial through its session: a trial with a frozen tower then never runs its image
tower, and one that trains it only drops the cached f(x).

Everything here is deterministic, so a trial restarted after a failure, or in a resumed sweep
(which computes them again), gets the same inputs and resumes exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from po_cluster.config import RunConfig
from po_cluster.data.records import ImageSet
from po_cluster.data.selection import build_records, held_out_sets, prompt_template
from po_cluster.evaluate.metrics import Evaluator
from po_cluster.model.aligned import AlignedCLIP
from po_cluster.train.loop import TrainData, build_model, prepare_data


@dataclass(frozen=True)
class SharedInputs:
    """The trials' common inputs, on the CPU (the object store holds them; each trial moves them)."""

    data: TrainData | None  # with the starting model's f(x) of every training image; None: streamed
    val_sets: dict[str, ImageSet]
    val_image_emb: dict[str, torch.Tensor]
    val_text_emb: dict[str, torch.Tensor]  # per validation set
    val_ref_clean_logps: torch.Tensor
    base_metrics: dict[str, float]  # the starting model's validation metrics (at t = 0)

    def train_data(self, image_tower_frozen: bool) -> TrainData:
        """A trial's TrainData: a tower that trains must see the pixels, not the start's f(x)."""
        if self.data is None:
            raise ValueError("the sweep streams its training records: no shared TrainData")
        return self.data if image_tower_frozen else replace(self.data, pref_emb=None, reg_emb=None)

    def evaluator(self, model: AlignedCLIP) -> Evaluator:
        """The validation evaluator of the starting model, for `model` (a trial's copy of it)."""
        return Evaluator(model, self.val_sets, self.val_image_emb, self.val_text_emb, self.val_ref_clean_logps)


def compute_shared_inputs(run: RunConfig) -> SharedInputs:
    """The inputs as a trial of `run` would compute them, with its starting model in frozen mode (the
    start is the same model in every mode: adapters start at zero, no block has moved yet)."""
    frozen = run.model_copy(update={"model": run.model.model_copy(update={"image_tower": "frozen"})})
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model = build_model(frozen, device)
    template = prompt_template(run.data)
    # A streaming sweep shares its validation alone: its trials read the train split as they go.
    data = None if run.data.streaming else \
        prepare_data(model, *build_records(run.data, model.preprocess.geometry), template).to(torch.device("cpu"))
    start = Evaluator.build(model, held_out_sets(run.data, "val", model.preprocess.geometry), template=template)
    return SharedInputs(data, start.sets, {k: v.cpu() for k, v in start.image_emb.items()},
                        {k: v.cpu() for k, v in start.text_emb.items()}, start.ref_clean_logps.cpu(),
                        start.metrics(0.0))
