"""In-process backend: a Flower Grid that hands each Message to the ClientApp directly.

Every virtual node gets its own ``Context`` when it is addressed, holding the state it
kept last time (``client_state``: in memory, or spilled to disk for large populations),
so per-client state such as error-feedback residuals lives exactly where it would on
a device; the ServerApp and ClientApp run unchanged. Nothing is done per node of the
population that is not addressed: a round costs the same with 100 or 10,000 nodes.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log
from flwr.serverapp import Grid

from pollen.flower_internals import SUPERLINK_NODE_ID, ErrorCode, Run, TaskIdentity, set_message_id
from pollen.simulations.client_state import ClientStates, InMemoryStates

RUN_ID = 1


class InProcessGrid(Grid):
    """Delivers messages to ``client_app`` in this process, one node at a time."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: dict,
                 states: ClientStates | None = None) -> None:
        self.client_app = client_app
        self.run_config = dict(run_config)
        # Node ids are 1..N: partition-id = node id - 1.
        self.node_ids = list(range(1, num_nodes + 1))
        self.states = states if states is not None else InMemoryStates()
        self._run = Run.create_empty(RUN_ID)
        self._run.override_config = self.run_config
        # Messages take their run id from the process's task identity, which
        # Flower's runtime sets before it calls a ServerApp; this backend is that runtime.
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = RUN_ID
        TaskIdentity.node_id = SUPERLINK_NODE_ID

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def context(self, node_id: int) -> Context:
        """A Context for ``node_id`` holding the state it kept after its last message."""
        return Context(
            run_id=RUN_ID, node_id=node_id,
            node_config={"partition-id": node_id - 1, "num-partitions": len(self.node_ids)},
            state=self.states.load(node_id), run_config=self.run_config,
        )

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("InProcessGrid delivers synchronously: use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("InProcessGrid delivers synchronously: use send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return [self.deliver(message) for message in messages]

    def deliver(self, message: Message) -> Message:
        """Run the ClientApp on one message; an exception becomes an error reply, as in Flower."""
        node_id = message.metadata.dst_node_id
        set_message_id(message, uuid4().hex)  # the SuperLink assigns ids; here this backend is it
        if not 1 <= node_id <= len(self.node_ids):
            return Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason=f"no node with id {node_id}"),
                           reply_to=message)
        context = self.context(node_id)
        try:
            reply = self.client_app(message, context)
        except Exception as error:  # a failing client must not stop the federation
            log(WARNING, "node %s raised %s: %s", node_id, type(error).__name__, error)
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                  reason=f"{type(error).__name__}: {error}"), reply_to=message)
        self.states.save(node_id, context.state)
        return reply

    def close(self) -> None:
        self.states.close()
