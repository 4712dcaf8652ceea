"""Validated configs: YAML in, JSON schema out.

Every config, whether a user's file or a Tune trial's sample, goes through these
models once, at the edge; past that the code trusts its inputs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, TypeVar, get_args, overload

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SHIPPED_BASE = "po-cluster:typo-shapes-base"  # `pretrained` value naming the committed base model


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field and the reason."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LastBlocksConfig(Strict):
    last_blocks: Annotated[int, Field(gt=0, description="train only the last k blocks of the image tower")]


class LoraConfig(Strict):
    rank: int = Field(8, gt=0, description="rank r of each adapter B·A")
    alpha: float = Field(16.0, gt=0, description="the adapter's output is scaled by alpha / rank")
    targets: tuple[str, ...] | None = Field(
        None, min_length=1, description="fnmatch patterns over the image tower's module names (Linear or "
        "Conv2d layers); default per architecture: a ViT's MLPs, a ResNet's bottleneck convolutions")


class LoraTowerConfig(Strict):
    lora: LoraConfig = Field(description="train low-rank adapters on the image tower, its weights frozen")


ImageTowerMode = Literal["full", "frozen"] | LastBlocksConfig | LoraTowerConfig


def image_tower_label(mode: ImageTowerMode) -> str:
    """One short name per mode, for sweeps, reports and /v1/models: full, frozen, last_blocks:k, lora:r8a16."""
    if isinstance(mode, LastBlocksConfig):
        return f"last_blocks:{mode.last_blocks}"
    if isinstance(mode, LoraTowerConfig):
        targets = "" if mode.lora.targets is None else "t" + ",".join(mode.lora.targets)
        return f"lora:r{mode.lora.rank}a{mode.lora.alpha:g}{targets}"
    return mode


class PreprocessConfig(Strict):
    """open_clip's image preprocessing settings (PreprocessCfg), each replacing the model's; size is the tower's."""
    resize_mode: Literal["shortest", "longest", "squash"] | None = None  # squash: aspect ratio not kept
    interpolation: Literal["bicubic", "bilinear"] | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    fill_color: int | None = Field(None, ge=0, le=255, description="grey level of `longest`'s padding")


class ModelConfig(Strict):
    name: str = Field("po-tiny-rn", description="open_clip architecture name")
    pretrained: str | None = Field(SHIPPED_BASE, description="open_clip tag (e.g. openai), local .safetensors "
                                   "path, s3:// URI, or " + SHIPPED_BASE)
    image_tower: ImageTowerMode = "full"
    cache_dir: str | None = None
    preprocess: str | PreprocessConfig | None = Field(None, description="default: open_clip's for name and "
                                                      "pretrained; an open_clip tag: that tag's; or settings")


class RetentionSetConfig(Strict):
    """A zero-shot benchmark the run must not forget (docs/data.md, "Forgetting, measured on standard
    benchmarks"): split once, by a seeded hash of each example, into a validation subset that trials
    and soups are chosen on and the rest that the release is scored on."""

    benchmark: str = Field(description="[NAME=]PATH: class folders or clip_benchmark's webdataset shards, "
                           "local or s3://; its accuracy is retain_NAME")
    val: int = Field(100, gt=0, description="images of its validation subset")
    test: int | None = Field(1000, gt=0, description="at most this many of the other images score the release "
                             "(None: all of them)")


class DataConfig(Strict):
    world: Literal["typo_shapes"] = "typo_shapes"
    task: Literal["typographic", "bias"] = Field(
        "typographic", description="the world's preference records: typographic attacks (name the shape, not the "
        "word), or the bias task (name the pattern the object shows, not its class's stereotyped one)")
    n_pairs: int = Field(4096, gt=0, description="preference records (attacked images)")
    n_reg: int = Field(2048, gt=0, description="regularisation images (the KL term's)")
    own_word: float = Field(0.25, ge=0, le=1, description="typographic task: share of the world's regularisation "
                            "images with their own class name written (docs/design.md, 'Ignoring the word')")
    n_val: int = Field(500, gt=0, description="images per validation set (for choosing)")
    seed: int = 0
    dataset: str | None = Field(
        None, description="built preference dataset folder or JSONL pairs file (local or s3://, docs/records.md) "
        "used instead of the world; n_pairs / n_reg then cap the records used (a seeded subset)")
    streaming: bool = Field(False, description="read the dataset's train split from its Parquet shards while "
                            "training (Ray Data in Ray Train) instead of decoding it into memory first; π_ref then "
                            "comes from the dataset's π_ref cache (docs/data.md); n_pairs / n_reg do not apply")
    retention: list[RetentionSetConfig] = Field(
        default_factory=list, description="zero-shot benchmarks kept: their mean accuracy is `retention` (with the "
        "world's own tasks, on the world), charged by the objective wherever it falls")

    @model_validator(mode="after")
    def _streaming_needs_a_dataset(self) -> DataConfig:
        if self.streaming and self.dataset is None:
            raise ValueError("streaming needs data.dataset: a built dataset of Parquet shards (the world is rendered)")
        if self.task != "typographic" and self.dataset is not None:
            raise ValueError(f"data.task {self.task!r} is one of the world's; a dataset's records say what they prefer")
        return self


LossType = Literal["dpo", "ipo", "kto", "ce", "anchor"]
AnchorSpace = Literal["logits", "embedding"]


class LossConfig(Strict):
    loss_type: LossType = "dpo"
    beta: float = Field(1.0, gt=0)
    kl_weight: float = Field(0.3, ge=0, description="λ, weight of KL(π_ref ‖ π) on clean images")
    desirable_weight: float = Field(1.0, gt=0)
    undesirable_weight: float = Field(1.0, gt=0)
    anchor_weight: float | None = Field(None, ge=0, description="μ, weight of the word-free anchor (x̄: the "
                                        "attacked image's scene without its word) added to dpo, ipo, kto or ce "
                                        "(unset: 0, the paper's losses); loss_type anchor is that term alone "
                                        "(unset: 1). With the anchor on, the KL term's π_ref answers are the "
                                        "reference's on the word-free twins too (docs/design.md)")
    anchor_space: AnchorSpace = Field("logits", description="where the anchor holds the policy: logits, "
                                      "KL(π_ref(·|x̄) ‖ π(·|x)) on the pairs' answers; embedding, 1 − cos(f(x), "
                                      "f_ref(x̄)) of the image tower's output on the pairs' and the "
                                      "regularisation images (the tower must train)")

    @model_validator(mode="after")
    def _anchor_loss_has_weight(self) -> LossConfig:
        # The anchor loss is its μ-weighted term alone: μ = 0 would leave λ·KL and nothing to learn.
        if self.loss_type == "anchor" and self.anchor_weight == 0:
            raise ValueError("loss_type anchor with anchor_weight 0 trains nothing but the KL term; leave "
                             "anchor_weight unset (1) or give it a weight > 0")
        return self

    @property
    def anchor_on(self) -> bool:
        """The anchor is part of the objective (po_cluster/losses.py, anchor_on, states the same rule)."""
        return self.loss_type == "anchor" or bool(self.anchor_weight)


class OptimizerConfig(Strict):
    lr: float = Field(5e-4, gt=0)
    spectral_lr: float | None = Field(None, gt=0, description="lr of the spectral layer (default: lr)")
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)


PrecisionName = Literal["fp32", "bf16", "fp16"]


class TrainingConfig(Strict):
    steps: int = Field(200, gt=0)
    batch_size: int = Field(64, gt=0)
    reg_batch_size: int = Field(64, gt=0)
    bma: bool = Field(True, description="report and save the Beta moving average of the iterates")
    bma_a: float = Field(0.7, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: PrecisionName = Field(
        "fp32", description="the training forward's autocast dtype; fp16 adds a gradient scaler and needs "
        "CUDA; the losses are computed in fp32 either way")
    seed: int = 0

    @model_validator(mode="after")
    def _fp16_needs_cuda(self) -> TrainingConfig:
        # "auto" is resolved where the run starts (train.precision says so there); "cpu" is known here.
        if self.precision == "fp16" and self.device == "cpu":
            raise ValueError("training.precision fp16 needs CUDA (training.device is cpu); use bf16 or fp32")
        return self


class TrackingConfig(Strict):
    """MLflow tracking of a sweep or a training run. Credentials for a server come from the usual
    MLFLOW_* environment variables (MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME, ...), never from here."""

    enabled: bool = True
    uri: str | None = Field(
        None, description="tracking URI (http://host:5000, sqlite:///path.db, ...); default: a sqlite file "
        "mlflow.db in the sweep's folder (a training run's output_dir), no server needed")
    experiment: str | None = Field(None, description="MLflow experiment name (default: the sweep's or run's name)")
    registered_model: str | None = Field(
        None, description="registered model that `average` adds each release to as a version (default: the "
        "sweep's name)")

    @model_validator(mode="after")
    def _uri_is_a_uri(self) -> TrackingConfig:
        if self.uri is not None and "://" not in self.uri and self.uri != "databricks":
            raise ValueError(f"uri {self.uri!r}: expected a URI such as http://127.0.0.1:5000 or sqlite:///mlflow.db")
        return self


class RunConfig(Strict):
    name: str = "run"
    output_dir: str = "runs"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    loss: LossConfig = LossConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    training: TrainingConfig = TrainingConfig()
    tracking: TrackingConfig = Field(TrackingConfig(), description="`po-cluster train` only: a sweep's "
                                     "tracking is the sweep config's own `tracking` section")

    @model_validator(mode="after")
    def _batch_fits(self) -> RunConfig:
        if self.training.batch_size > self.data.n_pairs:
            raise ValueError(f"training.batch_size {self.training.batch_size} > data.n_pairs {self.data.n_pairs}")
        return self

    @model_validator(mode="after")
    def _anchor_has_twins(self) -> RunConfig:
        # The anchor compares each image with its word-free twin: only the world's typographic
        # records carry one (a built dataset's rows do not, nor do the bias task's pattern pairs).
        if self.loss.anchor_on and (self.data.dataset is not None or self.data.task != "typographic"):
            raise ValueError("loss.loss_type anchor / loss.anchor_weight > 0 need each training image's "
                             "word-free twin, which only the world's typographic records carry (not "
                             "data.dataset, not data.task bias)")
        return self

    @model_validator(mode="after")
    def _embedding_anchor_trains_the_tower(self) -> RunConfig:
        # The embedding anchor moves the tower's output f(x); a frozen tower's f(x) is fixed (and
        # cached), so the term would be a constant without a gradient.
        if self.loss.anchor_on and self.loss.anchor_space == "embedding" and self.model.image_tower == "frozen":
            raise ValueError("loss.anchor_space embedding holds the image tower's output to the reference's "
                             "on the twins, which a frozen tower cannot move: train the tower (model."
                             "image_tower full, last_blocks or lora) or use anchor_space logits")
        return self


def _format_errors(source: str, error: ValidationError) -> str:
    lines = [f"invalid config {source}:"]
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  {where}: {item['msg']}")
    return "\n".join(lines)


# The config class a caller asks for is the type it gets back; without a model it is a RunConfig.
M = TypeVar("M", bound=Strict)


@overload
def parse_config(data: object, source: str = ...) -> RunConfig: ...
@overload
def parse_config(data: object, source: str, model: type[M]) -> M: ...
@overload
def parse_config(data: object, source: str = ..., *, model: type[M]) -> M: ...
def parse_config(data: object, source: str = "<dict>", model: type[Strict] = RunConfig) -> Strict:
    """Validate a mapping; raise ConfigError naming each bad field and why."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_errors(source, error)) from None


def load_yaml(path: str | Path) -> dict:
    """A YAML file's top-level mapping ({} when the file is empty), not yet validated.

    Raises ConfigError for a missing or unreadable file, bad YAML, or a top level that is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"invalid config {path}: not valid YAML ({error})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config {path}: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


@overload
def load_config(path: str | Path) -> RunConfig: ...
@overload
def load_config(path: str | Path, model: type[M]) -> M: ...
def load_config(path: str | Path, model: type[Strict] = RunConfig) -> Strict:
    """Read a YAML file into a validated config."""
    return parse_config(load_yaml(path), str(path), model)


def json_schema(model: type[Strict] = RunConfig) -> dict:
    return model.model_json_schema()


class ObjectiveConfig(Strict):
    """The weights of the validation objective (po_cluster/evaluate/objective.py)."""
    clean_tolerance: float = Field(0.02, ge=0)
    clean_penalty: float = Field(5.0, ge=0)
    retention_penalty: float = Field(5.0, ge=0, description="weight of the retention (the world's colour and size "
                                     "tasks) lost beyond clean_tolerance, in the objective")


class ReportingConfig(Strict):  # a trial's validation reports and resumable checkpoints
    report_every: int = Field(50, gt=0, description="steps between validation reports (ASHA's time unit)")
    checkpoint_every: int = Field(50, gt=0, description="steps between resumable checkpoints")


class _Sections(Strict):
    """A config with objective and reporting sections refuses their keys at its top level (where they
    were before the sections) by name, with their new place."""

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: object) -> object:
        sections: dict[str, type[Strict]] = {"objective": ObjectiveConfig, "reporting": ReportingConfig}
        moved = [f"{key} is now {name}.{key}" for name, section in sections.items() for key in section.model_fields
                 if isinstance(data, dict) and key in data]
        if moved:
            raise ValueError("; ".join(moved))
        return data


class TrainJobConfig(_Sections):
    """One training job (po_cluster/train/run.py): the run and, for a trial, how it reports and what it is
    scored by. Without `reporting` (a single-process run) nothing is reported on the way."""

    run: RunConfig
    objective: ObjectiveConfig = ObjectiveConfig()
    reporting: ReportingConfig | None = None
    trial_started_at: float | None = Field(None, description="the trial driver's time.time() at its start: "
                                           "reports then carry time_worker_start and time_trial")


# ---- Cluster: Ray Train workers and the Tune sweep ---------------------------------------------


class LogRangeConfig(Strict):
    low: float = Field(gt=0)
    high: float = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> LogRangeConfig:
        if self.low >= self.high:
            raise ValueError(f"low {self.low} must be < high {self.high}")
        return self


class LossSpaceConfig(Strict):
    """One loss's own ranges; a range left out is the shared one of the search space."""

    beta: LogRangeConfig | None = None
    kl_weight: LogRangeConfig | None = None


def _default_per_loss() -> dict[LossType, LossSpaceConfig]:
    # IPO regresses the margin onto 1/(2β): a larger β asks too little in a demo trial's steps, a smaller
    # one needs a larger λ to keep clean accuracy (docs/results.md, "IPO's β range"; docs/cluster.md).
    return {"ipo": LossSpaceConfig(beta=LogRangeConfig(low=0.014, high=0.019),
                                   kl_weight=LogRangeConfig(low=100.0, high=250.0))}


class SearchSpaceConfig(Strict):
    loss_type: list[LossType] = Field(["dpo", "ipo", "kto"], min_length=1)
    beta: LogRangeConfig = LogRangeConfig(low=0.05, high=2.0)
    kl_weight: LogRangeConfig = LogRangeConfig(low=0.01, high=1.0)
    per_loss: dict[LossType, LossSpaceConfig] = Field(default_factory=dict,
                                                description="a loss's own beta / kl_weight ranges")
    lr: LogRangeConfig | None = Field(None, description="log-uniform; None keeps base.optimizer.lr")
    image_tower: list[ImageTowerMode] | None = Field(None, description="choices; None keeps base.model.image_tower")

    @model_validator(mode="before")
    @classmethod
    def _per_loss_searched(cls, data: object) -> object:
        """A config's per_loss entries override the defaults loss by loss (`ipo: {}` restores the
        shared ranges); an entry for a loss that is not searched is a mistake."""
        if not isinstance(data, dict):
            return data
        searched = data.get("loss_type", cls.model_fields["loss_type"].default)
        given = data.get("per_loss", {})
        if not isinstance(searched, list) or not isinstance(given, dict):
            return data  # the field validators say what is wrong
        stray = sorted(str(k) for k in given if k not in searched)
        if stray:
            raise ValueError(f"per_loss names {stray}, which loss_type {searched} does not search")
        defaults = {k: v for k, v in _default_per_loss().items() if k in searched}
        return {**data, "per_loss": {**defaults, **given}}


class ScalingConfig(Strict):
    num_workers: int = Field(1, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, ge=0)
    gpus_per_worker: float = Field(1.0, ge=0, description="used only with use_gpu")
    resources_per_worker: dict[str, float] = Field(default_factory=dict, description="custom resources")
    data_cpus: float = Field(1.0, gt=0, description="with data.streaming: CPUs each Ray Data read/decode task "
                             "asks, and kept free per trial when the sweep sizes its concurrency")


class SchedulerConfig(Strict):
    grace_period: int = Field(1, gt=0, description="reports before ASHA may stop a trial")
    reduction_factor: float = Field(3.0, gt=1)


class AblationConfig(Strict):
    """`po-cluster ablate`: which image-tower attention heads a greedy search may ablate, and how it
    scores a set of heads on the training split (attacked accuracy less the share answered with the
    written word, charged for clean accuracy lost)."""

    max_heads: int = Field(4, gt=0, description="ablate at most this many heads")
    last_blocks: int | None = Field(None, gt=0, description="candidates: the heads of the last k attention "
                                    "modules only (None: every head of the tower)")
    n_images: int = Field(512, gt=0, description="attacked and clean training images the search scores on, each")
    clean_tolerance: float = Field(0.01, ge=0, description="clean accuracy a head set may lose for free")
    clean_penalty: float = Field(5.0, ge=0, description="the score's charge per unit of clean accuracy lost "
                                 "beyond the tolerance")
    min_gain: float = Field(0.0, ge=0, description="stop when no head raises the score by more than this")


class SweepConfig(_Sections):
    name: str = "sweep"
    storage_path: str = Field("runs/sweeps", description="local folder or s3://bucket/prefix")
    base: RunConfig = RunConfig()
    space: SearchSpaceConfig = SearchSpaceConfig()
    num_samples: int = Field(8, gt=0)
    max_concurrent_trials: int | None = Field(None, gt=0, description="None: derived from cluster resources")
    seed: int = 0
    scaling: ScalingConfig = ScalingConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    reporting: ReportingConfig = ReportingConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    max_failures: int = Field(2, ge=-1, description="worker failures a trial recovers from")
    top_k: int = Field(4, gt=0, description="trials combined into soups by `average`")
    share_inputs: bool = Field(True, description="compute the trials' common inputs (records, π_ref, g(y), the "
                               "start's f(x)) once per sweep in one Ray task and hand them to every trial")
    store: str = Field("artifacts", description="artifact store for the release: local folder or s3://")
    tracking: TrackingConfig = TrackingConfig()
    ablation: AblationConfig | None = Field(None, description="also ablate the base model's heads "
                                            "(`po-cluster ablate`) and report it beside the release (typographic "
                                            "task; null: not)")
    trial_runner: Literal["torch_trainer", "tune"] = Field(
        "torch_trainer", description="torch_trainer: each trial fits a TorchTrainer (DDP over scaling.num_workers); "
        "tune: a frozen-tower trial trains in the Tune trial itself, on scaling.cpus_per_worker (and "
        "gpus_per_worker) — fractions pack many trials on one CPU or GPU")

    @model_validator(mode="after")
    def _runner_fits(self) -> SweepConfig:
        if self.trial_runner != "tune":
            return self
        towers = self.space.image_tower or [self.base.model.image_tower]
        if any(tower != "frozen" for tower in towers):
            raise ValueError(f"trial_runner tune trains W alone and needs image_tower frozen, not {towers}")
        if self.scaling.num_workers != 1:
            raise ValueError("trial_runner tune runs one process per trial: scaling.num_workers must be 1")
        if self.base.data.streaming:
            raise ValueError("trial_runner tune reads the sweep's shared inputs: data.streaming must be false")
        return self

    @model_validator(mode="after")
    def _embedding_anchor_towers(self) -> SweepConfig:
        # A trial is the base with a searched tower: refuse a frozen one here rather than in each trial
        # (RunConfig says why the embedding anchor needs a tower that trains).
        towers = self.space.image_tower or [self.base.model.image_tower]
        anchored = any(LossConfig.model_validate({**self.base.loss.model_dump(), "loss_type": loss}).anchor_on
                       for loss in self.space.loss_type)
        if anchored and self.base.loss.anchor_space == "embedding" and "frozen" in towers:
            raise ValueError("base.loss.anchor_space embedding needs a tower that trains; space.image_tower "
                             "searches frozen")
        return self


def _every_loss() -> dict[LossType, dict[str, float]]:
    return {loss_type: {} for loss_type in get_args(LossType)}


class CompareConfig(Strict):
    """`po-cluster compare`: one base run, trained once per loss with that loss's settings, and the
    training-free head ablation of the same base beside them."""

    base: RunConfig = RunConfig()
    losses: dict[LossType, dict[str, float]] = Field(
        default_factory=_every_loss,
        description="loss_type → overrides of the loss section (beta, kl_weight, …)",
    )
    ablation: AblationConfig | None = Field(AblationConfig(), description="`po-cluster ablate` of the base "
                                            "run's model as one more row (null: none)")

    @model_validator(mode="after")
    def _overrides_valid(self) -> CompareConfig:
        for loss_type, overrides in self.losses.items():
            LossConfig.model_validate({**self.base.loss.model_dump(), **overrides, "loss_type": loss_type})
        return self

    def run_for(self, loss_type: LossType) -> RunConfig:
        loss = {**self.base.loss.model_dump(), **self.losses[loss_type], "loss_type": loss_type}
        data = self.base.model_dump(mode="json")
        data.update(name=f"{self.base.name}-{loss_type}", loss=loss)
        return RunConfig.model_validate(data)
