"""The parts of Flower that Pollen needs and Flower does not export publicly.

Everything else comes from Flower's public modules (``flwr.app``, ``flwr.serverapp``,
``flwr.clientapp``, ``flwr.common``'s ``__all__``). What is here has no public
equivalent in flwr 1.42, so it lives in this one module: ``pyproject.toml`` pins
``flwr`` to the tested range, and ``tests/test_flower_internals.py`` fails, naming
the API, on a Flower where any of it moved or changed shape.

- ``Run``: the type of ``Grid.set_run``/``Grid.run``, abstract methods every Grid
  (the in-process backend, the grid wrappers) must implement.
- ``TaskIdentity``: ``Message(...)`` reads its run, task and source node ids from it;
  Flower's runtime sets it before calling an app, so a runtime of our own (the
  in-process backend, tests, benchmarks) must set it too.
- ``SUPERLINK_NODE_ID``: the source node id of messages the ServerApp sends.
- ``ErrorCode``: the codes of ``flwr.app.Error`` that Flower's runtime uses for an
  unavailable node, a missing reply or a raising ClientApp; the simulations reply with
  the same codes so the ServerApp cannot tell them from a real deployment.
- ``get_all_nested_objects`` and ``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE``: the objects
  Flower serializes and sends for a record (each once), and the size above which an
  Array is cut into chunks; together they give the exact bytes on the wire.
  (``ArrayRecord.count_bytes()`` counts only data and key lengths, not the bytes sent.)
- ``recorddict_to_bytes``/``recorddict_from_bytes``: Flower's own lossless
  serializer of a whole RecordDict, for client state spilled to disk.
- ``set_message_id``: ``Metadata.message_id`` has no public setter; Flower's runtimes
  (e.g. its in-memory grid) write it the same way.
"""

from __future__ import annotations

from flwr.app import Message, RecordDict
from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE, SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = [
    "FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE",
    "SUPERLINK_NODE_ID",
    "ErrorCode",
    "Run",
    "TaskIdentity",
    "get_all_nested_objects",
    "recorddict_from_bytes",
    "recorddict_to_bytes",
    "set_message_id",
]


def recorddict_to_bytes(records: RecordDict) -> bytes:
    return recorddict_to_proto(records).SerializeToString()


def recorddict_from_bytes(data: bytes) -> RecordDict:
    return recorddict_from_proto(ProtoRecordDict.FromString(data))


def set_message_id(message: Message, message_id: str) -> None:
    message.metadata.__dict__["_message_id"] = message_id
