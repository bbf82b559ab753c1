# Importing pollen first sets Flower's offline switches before any test imports flwr.
import pollen  # noqa: F401
import pytest  # noqa: E402
from pollen.flower_internals import TaskIdentity  # noqa: E402


@pytest.fixture
def task_identity():
    """Messages built outside a running Flower app need a run, task and node id."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


@pytest.fixture
def one_thread():
    """Tiny federations: torch's threads cost more than they give on a shared 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
