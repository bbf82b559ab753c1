"""The ServerApp of a simulated federation on Flower's simulation engine (Ray).

It runs the same rounds as ``pollen.server.app`` through ``pollen.simulations.federation``,
into the run folder its SuperLink's environment names (``RunFolder.from_environment``),
on Flower's Grid seen two ways:

* ``PartitionGrid``: the engine gives its virtual nodes random 64-bit ids. Asked once
  (a ``query`` message each), every node names its ``partition-id``; from then on nodes
  are addressed as partition-id + 1, exactly as the in-process backend numbers them, so
  the same seed samples the same partitions on both backends.
* the device model (``simulations.devices.DeviceGrid``), as in process.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from pollen.config import config_from_run_config
from pollen.run_folder import RunFolder
from pollen.simulations.federation import simulated_federation
from pollen.simulations.grid_wrapper import GridWrapper

POLL_SECONDS = 0.05  # Flower's own send_and_receive waits 3 s between pulls

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = config_from_run_config(context.run_config)
    folder, _ = RunFolder.from_environment(config)  # a simulation starts afresh: no resume
    simulated_federation(PartitionGrid(grid, config.federation.num_clients), config, folder)


class PartitionGrid(GridWrapper):
    """Flower's Grid with nodes addressed by partition: node id = partition-id + 1."""

    def __init__(self, inner: Grid, num_nodes: int, timeout: float = 600.0) -> None:
        super().__init__(inner)
        self.num_nodes = num_nodes
        self.timeout = timeout
        self._node_of: dict[int, int] | None = None  # partition node id -> the engine's node id

    def get_node_ids(self) -> list[int]:
        return sorted(self._mapping())

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        mapping = self._mapping()
        messages = list(messages)
        for message in messages:
            message.metadata.dst_node_id = mapping[message.metadata.dst_node_id]
        return self.inner.push_messages(messages)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        pending = {i for i in self.push_messages(messages) if i}
        return self._collect(pending, timeout)

    def _collect(self, pending: set[str], timeout: float | None) -> list[Message]:
        """Pull until every reply is in or ``timeout`` passes; polls fast where Flower sleeps 3 s."""
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending and (end is None or time.monotonic() < end):
            arrived = list(self.inner.pull_messages(pending))
            replies.extend(arrived)
            pending -= {reply.metadata.reply_to_message_id for reply in arrived}
            if pending:
                time.sleep(POLL_SECONDS)
        return replies

    def _mapping(self) -> dict[int, int]:
        if self._node_of is None:
            self._node_of = self._discover()
        return self._node_of

    def _discover(self) -> dict[int, int]:
        """Ask every node for its partition-id, once."""
        engine_ids = list(self.inner.get_node_ids())
        queries = [Message(RecordDict(), node, MessageType.QUERY) for node in engine_ids]
        replies = self._collect({i for i in self.inner.push_messages(queries) if i}, self.timeout)
        node_of = {}
        for reply in replies:
            if reply.has_error():
                raise RuntimeError(f"node {reply.metadata.src_node_id} did not name its partition: "
                                   f"{reply.error.reason}")
            partition_id = int(reply.content["node"]["partition-id"])
            node_of[partition_id + 1] = reply.metadata.src_node_id
        if sorted(node_of) != list(range(1, self.num_nodes + 1)):
            raise RuntimeError(f"expected partitions 0..{self.num_nodes - 1} from {len(engine_ids)} nodes, "
                               f"got {len(node_of)} distinct answers")
        return node_of
