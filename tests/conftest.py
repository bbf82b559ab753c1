# Importing pollen first sets Flower's offline switches before any test imports flwr.
import pollen  # noqa: F401
import pytest  # noqa: E402
from pollen.flower_internals import TaskIdentity  # noqa: E402


@pytest.fixture
def task_identity():
    """Messages built outside a running Flower app need a run, task and node id."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
