"""The tracker of one config: where it logs (an MLflow URI), in which experiment, through which
client. Opening it probes the server once with a short timeout and no retries, so that a server
that is down costs seconds and one warning, not MLflow's minutes of retries and a failed sweep."""
from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from po_cluster.config import TrackingConfig

DB_FILE = "mlflow.db"
ARTIFACTS_FOLDER = "mlartifacts"
PROBE_TIMEOUT_S = 5.0

T = TypeVar("T")


class TrackingUnavailable(UserWarning):
    """Tracking could not be reached or refused a call; the run went on without it."""


_said: set[str] = set()  # URIs already warned about in this process: a pipeline says it once
_down: set[str] = set()  # URIs that failed: not tried again by this process (each try may cost retries)


def is_down(uri: str) -> bool:
    return uri in _down


def warn_once(uri: str, error: BaseException, what: str = "tracking", down: bool = True) -> None:
    """Say once per URI that tracking failed; `down`: and stop trying it in this process."""
    if down:
        _down.add(uri)
    if uri in _said:
        return
    _said.add(uri)
    reason = " ".join(str(error).split())[:300] or type(error).__name__
    warnings.warn(TrackingUnavailable(
        f"MLflow {what} at {uri} failed ({type(error).__name__}: {reason}); "
        "going on without tracking"), stacklevel=2)


def embedded_uri(folder: Path) -> str:
    """The default store: a sqlite file in the run's folder (the model registry needs a database)."""
    return f"sqlite:///{(folder / DB_FILE).resolve()}"


def resolve_uri(settings: TrackingConfig, folder: Path) -> str:
    return settings.uri or embedded_uri(folder)


def ui_hint(uri: str) -> str:
    """How to look at what was logged: a server is opened in a browser, an embedded store through `mlflow ui`."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


def artifact_location(uri: str) -> str | None:
    """A sqlite store's artifacts go beside its database file, not into ./mlruns of wherever the
    command ran (MLflow's default); a server decides for itself (None)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent.resolve() / ARTIFACTS_FOLDER).as_uri()


def _probe(uri: str) -> None:
    """One request, no retries, a short timeout; raises when a tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return  # a database or folder: opening it is the check
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    response = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/get-by-name", "GET",
                            max_retries=0, timeout=PROBE_TIMEOUT_S, params={"experiment_name": "po-cluster-probe"})
    if response.status_code not in (200, 404):  # 404: no such experiment, but the server answered
        raise ConnectionError(f"HTTP {response.status_code} from {uri}")


@dataclass(frozen=True)
class Tracker:
    uri: str
    experiment_id: str
    experiment_name: str
    client: Any  # mlflow.MlflowClient (imported on first use)

    def guarded(self, action: Callable[[], T], what: str = "tracking", down: bool = True) -> T | None:
        """`action()`, or None with one warning when tracking fails (and, with `down`, no more tries
        at this URI in this process): tracking never fails the run."""
        if is_down(self.uri):
            return None
        try:
            return action()
        except Exception as error:  # any failure of MLflow or the network, by design
            warn_once(self.uri, error, what, down)
            return None


def open_tracker(settings: TrackingConfig, folder: Path, default_name: str) -> Tracker | None:
    """The tracker of `settings` (the embedded store lives in `folder`), or None: disabled, or not
    reachable (said once, as a TrackingUnavailable warning)."""
    if not settings.enabled:
        return None
    uri = resolve_uri(settings, folder)
    if is_down(uri):
        return None  # said already
    name = settings.experiment or default_name
    # Creating the embedded database logs each migration step at INFO: not news on a command's output.
    for noisy in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        _probe(uri)
        from mlflow import MlflowClient

        if settings.uri is None:
            folder.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        found = client.get_experiment_by_name(name)
        if found is not None:
            return Tracker(uri, found.experiment_id, name, client)
        return Tracker(uri, client.create_experiment(name, artifact_location=artifact_location(uri)), name, client)
    except Exception as error:  # unreachable, refused, a bad URI: the run goes on untracked
        warn_once(uri, error)
        return None


def flat_params(values: dict[str, object], prefix: str = "") -> dict[str, str]:
    """Nested settings as MLflow parameters: dotted keys, string values (MLflow keeps them as text)."""
    out: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, f"{name}."))
        elif value is not None:
            out[name] = str(value)[:6000]  # MLflow's limit on a parameter's value
    return out


def run_params(settings: dict) -> dict[str, str]:
    """A run's settings (RunConfig as JSON) as parameters: every field dotted, and the ones a reader
    compares runs by also at the top (loss_type, beta, kl_weight, lr, image_tower, seed, steps)."""
    params = flat_params({k: v for k, v in settings.items() if k not in ("tracking", "name", "output_dir")})
    loss, training = settings["loss"], settings["training"]
    params.update({"loss_type": str(loss["loss_type"]), "beta": str(loss["beta"]),
                   "kl_weight": str(loss["kl_weight"]), "lr": str(settings["optimizer"]["lr"]),
                   "image_tower": json.dumps(settings["model"]["image_tower"]), "seed": str(training["seed"]),
                   "steps": str(training["steps"])})
    return params


def log_params(client: Any, run_id: str, params: dict[str, str], tags: dict[str, str] | None = None) -> None:
    """Parameters and tags through an MlflowClient, in batches of MLflow's limits (100 parameters a call)."""
    from mlflow.entities import Param, RunTag

    items = sorted(params.items())
    for start in range(0, max(len(items), 1), 100):
        client.log_batch(run_id, params=[Param(k, v) for k, v in items[start:start + 100]],
                                 tags=[RunTag(k, v) for k, v in (tags or {}).items()] if start == 0 else [])


def log_metrics(client: Any, run_id: str, rows: list[tuple[int, dict[str, float]]]) -> None:
    """(step, metrics) rows, in batches of MLflow's limit of 1000 metrics a call."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(key, float(value), now, step) for step, values in rows for key, value in values.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)]
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start:start + 1000])
