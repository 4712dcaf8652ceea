"""The application args of `build_app` (the `args:` of serve/config.yaml), validated once at the edge."""
from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from po_cluster.config import Strict
from po_cluster.serving.auth import AuthArgs
from po_cluster.serving.limits import Limits
from po_cluster.serving.ratelimit import RateLimit
from po_cluster.store.artifacts import StoreError, StoreSettings, check_release_id


class Batching(Strict):
    """@serve.batch at both tiers: each gateway replica coalesces concurrent requests into one model call
    per release; a model replica merges the calls that queue while it computes, and runs its towers on
    at most max_batch_size inputs (images, or texts) per pass."""

    max_batch_size: int = Field(16, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=10, description="how long a gateway batch waits to "
                                                                       "fill up")


class Autoscaling(Strict):
    """Passed to Serve as the model deployment's autoscaling_config."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(16, gt=0, description="per replica; about one full batch")
    upscale_delay_s: float = Field(10, ge=0)
    downscale_delay_s: float = Field(300, ge=0)

    @model_validator(mode="after")
    def _order(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be ≤ max_replicas")
        return self


class Draining(Strict):
    """How a replica that is being stopped (rolling update, downscale) drains: Serve stops routing to it,
    then waits until it has nothing in flight (checked every wait_loop_s), at most timeout_s."""

    graceful_shutdown_wait_loop_s: float = Field(2, ge=0)
    graceful_shutdown_timeout_s: float = Field(30, ge=0)


class ModelDeploymentArgs(Strict):
    num_cpus: float = Field(1, ge=0, description="Ray CPUs reserved per model replica")
    num_gpus: float = Field(0, ge=0)
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's own)")
    num_replicas: int = Field(1, ge=1, description="fixed replica count, used when autoscaling is not set "
                              "(1 for a laptop's `po-cluster serve`; the shipped configs run ≥ 2)")
    autoscaling: Autoscaling | None = None
    max_ongoing_requests: int = Field(64, ge=1, description="calls in flight per replica, each a gateway "
                                                             "batch; ≥ max_batch_size")
    max_queued_requests: int = Field(64, ge=1, description="calls a gateway replica queues for the model "
                                     "deployment beyond those in flight; more are a 503 at once")
    draining: Draining = Draining()
    max_releases_per_replica: int = Field(2, ge=1, description="releases held in memory (LRU), multiplexing")
    text_cache_size: int = Field(4096, ge=0, description="text embeddings g(y) cached per release")
    tower_cache_size: int = Field(4, ge=0, description="image towers at θ(t) kept per release (LRU, one per "
                                  "t to 0.01; each a copy of the trained tower weights)")


class GatewayArgs(Strict):
    num_cpus: float = Field(0.5, ge=0)
    num_replicas: int = Field(1, ge=1, description="the shipped configs run 2, so that losing one (or a "
                              "rolling update) drops nothing")
    max_ongoing_requests: int = Field(256, ge=1)
    max_queued_requests: int = Field(512, ge=1, description="requests the proxy queues for the gateway "
                                     "beyond those in flight; more are a 503 at once")
    draining: Draining = Draining()


class ServeArgs(Strict):
    store: str = Field(description="release store: a folder or s3://bucket/prefix")
    store_settings: StoreSettings = StoreSettings()
    default_release: str = Field("latest", description='served when a request names none; "latest" follows '
                                                       "the store's pointer")
    latest_ttl_s: float = Field(5.0, ge=0, description="how long the latest pointer is trusted before re-reading")
    limits: Limits = Limits()
    batching: Batching = Batching()
    model: ModelDeploymentArgs = ModelDeploymentArgs()
    gateway: GatewayArgs = GatewayArgs()
    auth: AuthArgs = AuthArgs()
    rate_limit: RateLimit = RateLimit()

    @field_validator("default_release")
    @classmethod
    def _release(cls, value: str) -> str:
        if value != "latest":
            try:
                check_release_id(value)
            except StoreError as error:
                raise ValueError(str(error)) from None
        return value

    @model_validator(mode="after")
    def _batches_can_fill(self) -> ServeArgs:
        if self.model.max_ongoing_requests < self.batching.max_batch_size:
            raise ValueError("model.max_ongoing_requests must be ≥ batching.max_batch_size")
        return self
