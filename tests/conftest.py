import logging
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


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
def small_sets():
    """Small validation-seeded sets for quick checks (the fixed evaluation sets are for reports)."""
    from po_cluster.data import world

    return world.validation_sets(200)
