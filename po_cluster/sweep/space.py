"""The sweep's search space, defined by run: the loss first, then that loss's own β and λ.

β does not mean the same thing to every loss: IPO regresses the margin onto 1/(2β), so a β that suits
DPO or KTO drives IPO's margin to a few units and the trial learns nothing. So each loss has its own
ranges (`space.per_loss`, falling back to the shared `space.beta` and `space.kl_weight`) and samples
them under its own names (beta_ipo, kl_weight_ipo, …): TPE models each loss's parameters apart. The
sampled values are also returned under the plain names beta and kl_weight, which the trial, the
tracking run and the report read.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution

from po_cluster.config import ConfigError, ImageTowerMode, LogRangeConfig, SweepConfig, image_tower_label

Distributions = dict[str, BaseDistribution]


def tower_choices(cfg: SweepConfig) -> dict[str, ImageTowerMode]:
    """The sweep's image tower choices by label (Optuna samples the label)."""
    choices = {image_tower_label(mode): mode for mode in cfg.space.image_tower or ()}
    if len(choices) != len(cfg.space.image_tower or ()):
        names = [image_tower_label(m) for m in cfg.space.image_tower or ()]
        raise ConfigError(f"space.image_tower: two choices share a name: {names}")
    return choices


def loss_ranges(cfg: SweepConfig) -> dict[str, tuple[LogRangeConfig, LogRangeConfig]]:
    """(β range, λ range) of each searched loss."""
    space = cfg.space
    out: dict[str, tuple[LogRangeConfig, LogRangeConfig]] = {}
    for loss in space.loss_type:
        own = space.per_loss.get(loss)
        out[loss] = (own.beta if own and own.beta else space.beta,
                     own.kl_weight if own and own.kl_weight else space.kl_weight)
    return out


def _log(r: LogRangeConfig) -> FloatDistribution:
    return FloatDistribution(r.low, r.high, log=True)


def distributions(cfg: SweepConfig) -> Distributions:
    """Every parameter a trial of this sweep may have, with its distribution."""
    out: Distributions = {"loss_type": CategoricalDistribution(cfg.space.loss_type)}
    for loss, (beta, kl_weight) in loss_ranges(cfg).items():
        out[f"beta_{loss}"], out[f"kl_weight_{loss}"] = _log(beta), _log(kl_weight)
    if cfg.space.lr is not None:
        out["lr"] = _log(cfg.space.lr)
    if cfg.space.image_tower is not None:
        out["image_tower"] = CategoricalDistribution(list(tower_choices(cfg)))
    return out


def _suggest(trial: optuna.Trial, name: str, dist: BaseDistribution):
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if not isinstance(dist, FloatDistribution):
        raise TypeError(f"{name}: no suggestion for a {type(dist).__name__}")
    return trial.suggest_float(name, dist.low, dist.high, log=dist.log)


def sample(dists: Distributions, trial: optuna.Trial) -> dict[str, float]:
    """The define-by-run space: Ray records every suggested value and adds what this returns."""
    loss = _suggest(trial, "loss_type", dists["loss_type"])
    chosen = {"beta": _suggest(trial, f"beta_{loss}", dists[f"beta_{loss}"]),
              "kl_weight": _suggest(trial, f"kl_weight_{loss}", dists[f"kl_weight_{loss}"])}
    for name in ("lr", "image_tower"):
        if name in dists:
            _suggest(trial, name, dists[name])
    return chosen


def define_by_run(cfg: SweepConfig) -> Callable[[optuna.Trial], dict[str, float]]:
    """A partial of a module function over plain data: Tune pickles the searcher with the standard
    pickle when it saves its state, which takes no closures."""
    return functools.partial(sample, distributions(cfg))


def _middle(r: LogRangeConfig) -> float:
    return math.sqrt(r.low * r.high)


def starting_points(cfg: SweepConfig) -> list[dict]:
    """One trial per loss at the geometric middle of its ranges, so every loss is tried."""
    points = []
    for loss, (beta, kl_weight) in list(loss_ranges(cfg).items())[:cfg.num_samples]:
        point: dict[str, object] = {"loss_type": loss, f"beta_{loss}": _middle(beta),
                                    f"kl_weight_{loss}": _middle(kl_weight)}
        if cfg.space.lr is not None:
            point["lr"] = _middle(cfg.space.lr)
        if cfg.space.image_tower is not None:
            point["image_tower"] = image_tower_label(cfg.space.image_tower[0])
        points.append(point)
    return points
