"""The serving app's settings, in Ray Serve's terms, validated at the edge.

A Serve config (serve/config.yaml, a RayService's serveConfigV2) splits them as Serve does:

- the application's `args` (`AppConfig`): only what a running replica cannot take in place, since Serve
  treats a change of args as new code and replaces every replica: the store each replica opens, and
  the memory it sizes when it starts (releases per replica, its caches);
- each deployment's options in its `deployments:` entry (replicas, autoscaling, max ongoing and queued
  requests, actor options, graceful shutdown, max_replicas_per_node): Serve applies a change of
  replicas, autoscaling, queue bounds or shutdown timing to the running replicas;
- each deployment's `user_config` (`GatewayUserConfig`, `ModelUserConfig`): what may change while serving
  (limits, rate limit, keys, default release, batching), handed to the running replicas' `reconfigure`.

`ServeConfig` holds all of it in one document, for `po-cluster serve` and `start_local`; `deployments()`
and `app_args()` split it into the same Serve options and user_configs a config file states.
"""
from __future__ import annotations

from typing import Any, TypeVar

from pydantic import Field, ValidationError, field_validator, model_validator

from po_cluster.config import ConfigError, Strict
from po_cluster.serving.auth import AuthConfig
from po_cluster.serving.limits import LimitsConfig
from po_cluster.serving.ratelimit import RateLimitConfig
from po_cluster.store.artifacts import StoreConfig, StoreError, check_release_id

M = TypeVar("M", bound=Strict)


class BatchingConfig(Strict):
    """@serve.batch at both tiers: each gateway replica coalesces concurrent requests into one model call
    per release; a model replica merges the calls that queue while it computes, and runs its towers on
    at most max_batch_size inputs (images, or texts) per pass."""

    max_batch_size: int = Field(16, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=10, description="how long a gateway batch waits to "
                                                                       "fill up")


class AutoscalingConfig(Strict):
    """Passed to Serve as the model deployment's autoscaling_config."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(16, gt=0, description="per replica; about one full batch")
    upscale_delay_s: float = Field(10, ge=0)
    downscale_delay_s: float = Field(300, ge=0)

    @model_validator(mode="after")
    def _order(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be ≤ max_replicas")
        return self


class DrainingConfig(Strict):
    """How a replica that is being stopped (rolling update, downscale) drains: Serve stops routing to it,
    then waits until it has nothing in flight (checked every wait_loop_s), at most timeout_s."""

    graceful_shutdown_wait_loop_s: float = Field(2, ge=0)
    graceful_shutdown_timeout_s: float = Field(30, ge=0)


class ReplicaMemoryConfig(Strict):
    """What a model replica sizes when it starts (Serve's multiplexer takes its bound once)."""

    max_releases_per_replica: int = Field(2, ge=1, description="releases held in memory (LRU), multiplexing")
    text_cache_size: int = Field(4096, ge=0, description="text embeddings g(y) cached per release")
    tower_cache_size: int = Field(4, ge=0, description="image towers at θ(t) kept per release (LRU, one per "
                                  "t to 0.01; each a copy of the trained tower weights)")


class ModelDeploymentConfig(ReplicaMemoryConfig):
    num_cpus: float = Field(1, ge=0, description="Ray CPUs reserved per model replica")
    num_gpus: float = Field(0, ge=0)
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's own)")
    num_replicas: int = Field(1, ge=1, description="fixed replica count, used when autoscaling is not set "
                              "(1 for a laptop's `po-cluster serve`; the shipped configs run ≥ 2)")
    autoscaling: AutoscalingConfig | None = None
    max_ongoing_requests: int = Field(64, ge=1, description="calls in flight per replica, each a gateway "
                                                             "batch; ≥ max_batch_size")
    max_queued_requests: int = Field(64, ge=1, description="calls a gateway replica queues for the model "
                                     "deployment beyond those in flight; more are a 503 at once")
    draining: DrainingConfig = DrainingConfig()
    max_replicas_per_node: int | None = Field(None, ge=1, description="at most this many model replicas on "
                                              "one node (pod), so that losing one loses fewer")


class GatewayConfig(Strict):
    num_cpus: float = Field(0.5, ge=0)
    num_replicas: int = Field(1, ge=1, description="the shipped configs run 2, so that losing one (or a "
                              "rolling update) drops nothing")
    max_ongoing_requests: int = Field(256, ge=1)
    max_queued_requests: int = Field(512, ge=1, description="requests the proxy queues for the gateway "
                                     "beyond those in flight; more are a 503 at once")
    draining: DrainingConfig = DrainingConfig()
    max_replicas_per_node: int | None = Field(None, ge=1)


def _release_name(value: str) -> str:
    if value != "latest":
        try:
            check_release_id(value)
        except StoreError as error:
            raise ValueError(str(error)) from None
    return value


class AppConfig(Strict):
    """The application's `args`: what needs new replicas (a change replaces every replica)."""

    store: str = Field(description="release store: a folder or s3://bucket/prefix")
    store_settings: StoreConfig = StoreConfig()
    model: ReplicaMemoryConfig = ReplicaMemoryConfig()


class GatewayUserConfig(Strict):
    """The Gateway deployment's user_config: applied to running replicas by reconfigure."""

    default_release: str = Field("latest", description='served when a request names none; "latest" follows '
                                                       "the store's pointer")
    latest_ttl_s: float = Field(5.0, ge=0, description="how long the latest pointer is trusted before re-reading")
    limits: LimitsConfig = LimitsConfig()
    batching: BatchingConfig = BatchingConfig()
    auth: AuthConfig = AuthConfig()
    rate_limit: RateLimitConfig = RateLimitConfig()

    _release = field_validator("default_release")(_release_name)


class ModelUserConfig(Strict):
    """The AlignedModel deployment's user_config: applied to running replicas by reconfigure."""

    max_batch_size: int = Field(16, ge=1, le=1024, description="inputs per tower pass and per merged call; "
                                "the gateways' batching.max_batch_size")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's own)")


GATEWAY, MODEL = "Gateway", "AlignedModel"  # the deployments' names (app.py)
USER_CONFIG: dict[str, type[Strict]] = {GATEWAY: GatewayUserConfig, MODEL: ModelUserConfig}


def validated(model: type[M], value: Any, where: str) -> M:
    """`model` from value, or a ConfigError naming each bad field under `where`."""
    try:
        return model.model_validate(value if value is not None else {})
    except ValidationError as error:
        fields = "; ".join(f"{where}.{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in error.errors())
        raise ConfigError(f"invalid {where}: {fields}") from None


class ServeConfig(Strict):
    store: str = Field(description="release store: a folder or s3://bucket/prefix")
    store_settings: StoreConfig = StoreConfig()
    default_release: str = Field("latest", description='served when a request names none; "latest" follows '
                                                       "the store's pointer")
    latest_ttl_s: float = Field(5.0, ge=0, description="how long the latest pointer is trusted before re-reading")
    limits: LimitsConfig = LimitsConfig()
    batching: BatchingConfig = BatchingConfig()
    model: ModelDeploymentConfig = ModelDeploymentConfig()
    gateway: GatewayConfig = GatewayConfig()
    auth: AuthConfig = AuthConfig()
    rate_limit: RateLimitConfig = RateLimitConfig()

    _release = field_validator("default_release")(_release_name)

    @model_validator(mode="after")
    def _batches_can_fill(self) -> ServeConfig:
        if self.model.max_ongoing_requests < self.batching.max_batch_size:
            raise ValueError("model.max_ongoing_requests must be ≥ batching.max_batch_size")
        return self

    def app_args(self) -> dict[str, Any]:
        memory = ReplicaMemoryConfig.model_fields
        model = ReplicaMemoryConfig(**{k: getattr(self.model, k) for k in memory})
        return AppConfig(store=self.store, store_settings=self.store_settings, model=model).model_dump(mode="json")

    def gateway_settings(self) -> GatewayUserConfig:
        return GatewayUserConfig(default_release=self.default_release, latest_ttl_s=self.latest_ttl_s,
                               limits=self.limits, batching=self.batching, auth=self.auth, rate_limit=self.rate_limit)

    def model_settings(self) -> ModelUserConfig:
        return ModelUserConfig(max_batch_size=self.batching.max_batch_size, torch_threads=self.model.torch_threads)

    def deployments(self) -> list[dict[str, Any]]:
        """Each deployment's entry as a Serve config's `deployments:` states it: options and user_config."""
        model, gateway = self.model, self.gateway
        scaling: dict[str, Any] = ({"autoscaling_config": model.autoscaling.model_dump(exclude_none=True)}
                                   if model.autoscaling else {"num_replicas": model.num_replicas})
        per_node = {"max_replicas_per_node": model.max_replicas_per_node} if model.max_replicas_per_node else {}
        gateway_per_node = {"max_replicas_per_node": gateway.max_replicas_per_node} \
            if gateway.max_replicas_per_node else {}
        return [
            {"name": GATEWAY, "num_replicas": gateway.num_replicas,
             "max_ongoing_requests": gateway.max_ongoing_requests, "max_queued_requests": gateway.max_queued_requests,
             **gateway.draining.model_dump(), **gateway_per_node, "ray_actor_options": {"num_cpus": gateway.num_cpus},
             "user_config": self.gateway_settings().model_dump(mode="json")},
            {"name": MODEL, **scaling, "max_ongoing_requests": model.max_ongoing_requests,
             "max_queued_requests": model.max_queued_requests, **model.draining.model_dump(), **per_node,
             "ray_actor_options": {"num_cpus": model.num_cpus, "num_gpus": model.num_gpus},
             "user_config": self.model_settings().model_dump(mode="json")},
        ]


def check_application(app: dict[str, Any]) -> AppConfig:
    """A Serve config's application of this app, each section checked as a deploy would check it (Serve's
    own schema for the options; args and each user_config here): a ConfigError names the bad field."""
    from ray.serve.schema import ServeApplicationSchema

    try:
        ServeApplicationSchema.model_validate(app)
    except ValidationError as error:
        raise ConfigError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())) from None
    args = validated(AppConfig, app.get("args"), "args")
    entries = {entry["name"]: entry for entry in app.get("deployments") or []}
    for name in entries:
        if name not in USER_CONFIG:
            raise ConfigError(f"deployments: no deployment named {name!r} (there are {sorted(USER_CONFIG)})")
    gateway = validated(GatewayUserConfig, entries.get(GATEWAY, {}).get("user_config"),
                        f"deployments[{GATEWAY}].user_config")
    model = validated(ModelUserConfig, entries.get(MODEL, {}).get("user_config"), f"deployments[{MODEL}].user_config")
    ongoing = entries.get(MODEL, {}).get("max_ongoing_requests", ModelDeploymentConfig().max_ongoing_requests)
    if ongoing < gateway.batching.max_batch_size:  # a model replica must hold one whole gateway batch
        raise ConfigError(f"deployments[{MODEL}].max_ongoing_requests ({ongoing}) must be ≥ "
                          f"deployments[{GATEWAY}].user_config.batching.max_batch_size "
                          f"({gateway.batching.max_batch_size})")
    if model.max_batch_size != gateway.batching.max_batch_size:  # one batch size at both tiers
        raise ConfigError(f"deployments[{MODEL}].user_config.max_batch_size ({model.max_batch_size}) must equal "
                          f"deployments[{GATEWAY}].user_config.batching.max_batch_size "
                          f"({gateway.batching.max_batch_size})")
    return args
