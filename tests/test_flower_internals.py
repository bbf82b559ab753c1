"""The Flower internals Pollen relies on (pollen/flower_internals.py) are still there and still behave.

pyproject.toml pins flwr to the release range these were checked on; on any other Flower
these tests name the API that moved or changed, so it can be adapted in that one module.
"""

import ast
import importlib
import tomllib
import typing
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
INTERNALS = ROOT / "pollen" / "flower_internals.py"
PIN = next(requirement for requirement in map(
    Requirement, tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    if requirement.name == "flwr")


def changed(api: str) -> str:
    return (f"{api} is not what Pollen expects on flwr {version('flwr')}; Pollen is tested with "
            f"flwr{PIN.specifier} (pyproject.toml): adapt pollen/flower_internals.py")


def flower_imports() -> list[tuple[str, str]]:
    """(module, name) of every Flower import in pollen/flower_internals.py, read without importing it."""
    return [(node.module, alias.name) for node in ast.walk(ast.parse(INTERNALS.read_text()))
            if isinstance(node, ast.ImportFrom) and node.module.split(".")[0] == "flwr"
            for alias in node.names]


def test_installed_flower_is_the_tested_range():
    assert PIN.specifier.contains(version("flwr")), (
        f"flwr {version('flwr')} is installed; Pollen is tested with flwr{PIN.specifier}")


@pytest.mark.parametrize(("module", "name"), flower_imports())
def test_every_flower_name_pollen_imports_exists(module, name):
    try:
        getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        pytest.fail(changed(f"{module}.{name}"))


@pytest.fixture
def internals():
    """Imported per test, so that a missing name fails the test above by name, not this module."""
    return importlib.import_module("pollen.flower_internals")


def test_grid_still_speaks_run(internals):
    hints = typing.get_type_hints(Grid.set_run)
    assert hints.get("run") is internals.Run, changed("Grid.set_run(run: flwr.supercore.run.Run)")
    run = internals.Run.create_empty(5)
    run.override_config = {"seed": 1}
    assert (run.run_id, run.override_config) == (5, {"seed": 1}), changed("Run.create_empty / Run.override_config")


def test_messages_take_their_ids_from_the_task_identity(internals, task_identity):
    message = Message(RecordDict(), dst_node_id=3, message_type="train")
    assert (message.metadata.run_id, message.metadata.src_node_id) == (1, 0), \
        changed("TaskIdentity (Message reads run_id and src_node_id from it)")
    assert isinstance(internals.SUPERLINK_NODE_ID, int), changed("SUPERLINK_NODE_ID")
    internals.set_message_id(message, "abc")
    assert message.metadata.message_id == "abc", changed("Metadata._message_id")


@pytest.mark.parametrize("code", ["NODE_UNAVAILABLE", "REPLY_MESSAGE_UNAVAILABLE", "CLIENT_APP_RAISED_EXCEPTION"])
def test_error_codes_pollen_replies_with_exist(internals, code):
    assert isinstance(getattr(internals.ErrorCode, code, None), int), changed(f"ErrorCode.{code}")


def test_nested_objects_are_what_flower_sends_with_arrays_chunked_above_the_limit(internals):
    limit = internals.FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
    assert isinstance(limit, int) and limit > 0, changed("FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE")
    # A payload of exactly the limit is one chunk, one byte more is two different chunks;
    # the objects are the record, its array (sent once, though it occurs twice) and the chunks.
    for size, objects in ((limit, 3), (limit + 1, 4)):
        data = (bytes(range(256)) * (size // 256 + 1))[:size - 1] + b"x"
        array = Array(dtype="uint8", shape=(size,), stype="raw", data=data)
        nested = internals.get_all_nested_objects(ArrayRecord({"a": array, "b": array}))
        assert len(nested) == objects and all(isinstance(obj.deflate(), bytes) for obj in nested.values()), \
            changed("get_all_nested_objects / Array chunking")


def test_recorddicts_survive_flowers_serializer_bit_exact(internals):
    records = RecordDict({"arrays": ArrayRecord({"w": Array(np.array([1.5, -2.0], np.float32))}),
                          "config": ConfigRecord({"round": 3, "name": "x"}),
                          "metrics": MetricRecord({"loss": 0.25})})
    back = internals.recorddict_from_bytes(internals.recorddict_to_bytes(records))
    assert (back["arrays"]["w"].numpy().tobytes() == records["arrays"]["w"].numpy().tobytes()
            and dict(back["config"]) == dict(records["config"])
            and dict(back["metrics"]) == dict(records["metrics"])), changed("flwr.common.serde recorddict_*_proto")
