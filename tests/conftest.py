import logging
import os
import sys
from pathlib import Path

import pytest

# Under pytest-xdist (`make test`: -n 2) each worker's torch gets its share of the cores, set before
# torch is imported, and so do the processes a worker starts (the Ray cluster's workers among them).
# Otherwise two OpenMP pools of all the cores each oversubscribe them, and their spinning threads
# slow both workers' training far more than sharing the cores would. A value the user set stands.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

ROOT = Path(__file__).resolve().parent.parent
# The tests mirror the package (tests/unit/<package>/, tests/integration/<package>/, tests/repo/ for
# checks of the repository itself); the helpers that tests of several packages import by name
# (typo_helpers, serving_helpers) live in tests/helpers, put on the path here, before collection.
sys.path.insert(0, str(ROOT / "tests" / "helpers"))
# A test's markers say what it needs, and follow from the fixtures it uses (directly or through
# another fixture), so they cannot drift: `-m "not integration"` runs without Ray, `-m "not s3"`
# without moto. `slow` (minutes) stays by hand.
NEEDS = {"ray_cluster": "integration", "moto_s3": "s3"}
FAST = (ROOT / "tests" / "unit", ROOT / "tests" / "repo")  # `make unit`'s tiers
INTEGRATION = "tests/integration/"


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under pytest-xdist (`make test`: -n 2 --dist loadgroup) every test of tests/integration is one
    work unit, run on one worker in order as without xdist: one Ray cluster and one moto server per
    session (two clusters on one machine break Train's placement-group cleanup), and the timed serving
    tests never share the cores with another cluster. Each unit test is its own unit, filling the other
    worker. (The grouping is the scheduler's: xdist's `xdist_group` mark renames node ids, which
    pytest 9.2 no longer lets a plugin do.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class IntegrationInOrder(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "integration" if nodeid.startswith(INTEGRATION) else nodeid

    return IntegrationInOrder(config, log)


def pytest_collection_modifyitems(config, items):
    for item in items:
        needs = sorted(NEEDS[name] for name in NEEDS if name in getattr(item, "fixturenames", ()))
        if needs and any(item.path.is_relative_to(tier) for tier in FAST):
            # `make unit` must stay fast and start no cluster or server
            raise pytest.UsageError(f"{item.nodeid} needs {' and '.join(needs)}: move it to tests/integration")
        for marker in needs:
            item.add_marker(marker)


@pytest.fixture(autouse=True, scope="session")
def _quiet_open_clip():
    # open_clip warns on the root logger for every model built before we load weights.
    logging.getLogger().setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def base_model():
    """The shipped base model as an AlignedCLIP with a frozen image tower."""
    from po_cluster.config import ModelConfig
    from po_cluster.model.aligned import AlignedCLIP
    from po_cluster.model.loading import load_clip

    return AlignedCLIP(load_clip(ModelConfig()), "frozen")


@pytest.fixture(scope="session")
def pixels(base_model):
    """Model input of a few attacked images of the world, for checks of the image tower."""
    from po_cluster.data import world

    return base_model.pixels(world.image_set("attacked", 8, seed=5).images)


@pytest.fixture(scope="session")
def small_sets():
    """Small validation-seeded sets for quick checks (the fixed evaluation sets are for reports)."""
    from po_cluster.data import world

    return world.validation_sets(200)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session (a `ray.init` costs seconds here).

    Ray addresses its node by the host's own interface address (it maps 127.0.0.1
    to it on purpose), so its traffic stays on this machine; the dashboard binds
    127.0.0.1. Other processes (a sweep driver the tests start and kill) join it
    through the returned GCS address, authenticated by the token Ray keeps in
    ~/.ray/auth_token.
    """
    import ray

    if not ray.is_initialized():
        # The dashboard stays on: Ray Train cleans up the placement groups of a stopped trial
        # through the state API it serves.
        from po_cluster.serving import ingress

        ingress.enable()  # as po-cluster starts its own Ray: the serving tests go through HAProxy
        ray.init(num_cpus=2, include_dashboard=True,
                 log_to_driver=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def release_template(tmp_path_factory) -> Path:
    """A real checkpoint folder (tiny random model) plus a card, with its manifest rewritten."""
    import torch

    from po_cluster.config import ModelConfig
    from po_cluster.data import world
    from po_cluster.model.aligned import AlignedCLIP
    from po_cluster.model.checkpoint import model_description, save_checkpoint, write_manifest
    from po_cluster.model.loading import load_clip

    torch.manual_seed(0)
    cfg = ModelConfig(pretrained=None, image_tower="frozen")
    model = AlignedCLIP(load_clip(cfg), "frozen")
    folder = save_checkpoint(tmp_path_factory.mktemp("release") / "ckpt", model,
                             model_description(model, cfg, world.SHAPES, "a photo of a {}."),
                             {"loss_type": "dpo", "beta": 0.1}, {"clean": 0.9, "attacked": 0.7})
    (folder / "card.md").write_text("# test release\n\nA tiny random po-tiny-rn, for storage tests.\n")
    write_manifest(folder)
    return folder
