"""In-process backend: a Flower Grid that hands each Message to the ClientApp directly.

Every virtual node gets its own ``Context`` when it is addressed, holding the state it
kept last time (``client_state``: in memory, or spilled to disk for large populations),
so per-client state such as error-feedback residuals lives exactly where it would on
a device; the ServerApp and ClientApp run unchanged. Nothing is done per node of the
population that is not addressed: a round costs the same with 100 or 10,000 nodes.

A client that fails in any way (any exception, ``SystemExit`` included) becomes an
error reply, as Flower's runtime reports a raising ClientApp; only Ctrl-C
(``KeyboardInterrupt``) stops the run. With a ``client_timeout`` a client runs in a
thread of its own and is given up after that many wall-clock seconds: the round goes on
with a REPLY_MESSAGE_UNAVAILABLE reply (a straggler's), the client's state stays as it
was, and the thread is asked to stop (an exception raised in it at its next Python
instruction). Python cannot kill a thread: one stuck inside a single long native call
runs on until that call returns, sharing the process's cached model with the clients
after it, and whatever it returns is thrown away.
"""

from __future__ import annotations

import ctypes
import threading
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
                 states: ClientStates | None = None, client_timeout: float = 0.0) -> None:
        self.client_app = client_app
        self.client_timeout = client_timeout  # wall-clock seconds per message; 0 = no limit
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
        """Run the ClientApp on one message; a failure becomes an error reply, as in Flower."""
        node_id = message.metadata.dst_node_id
        set_message_id(message, uuid4().hex)  # the SuperLink assigns ids; here this backend is it
        if not 1 <= node_id <= len(self.node_ids):
            return Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason=f"no node with id {node_id}"),
                           reply_to=message)
        context = self.context(node_id)
        call = ClientCall(self.client_app, message, context)
        if self.client_timeout:
            call.run_within(self.client_timeout)
        else:
            call.run()
        if call.timed_out:
            log(WARNING, "node %s took longer than %g s; its reply is given up", node_id, self.client_timeout)
            return Message(Error(code=ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
                                 reason=f"no reply within the client timeout of {self.client_timeout:g} s"),
                           reply_to=message)
        if isinstance(call.error, KeyboardInterrupt):  # Ctrl-C, or a client that raised it: stop the run
            raise call.error
        if call.error is not None:  # a failing client must not stop the federation
            error = call.error
            log(WARNING, "node %s raised %s: %s", node_id, type(error).__name__, error)
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                  reason=f"{type(error).__name__}: {error}"), reply_to=message)
        else:
            reply = call.reply
        self.states.save(node_id, context.state, server_round_of(message))
        return reply

    def close(self) -> None:
        self.states.close()


class ClientCall:
    """One ClientApp call: its reply or what it raised, or that it ran out of time."""

    def __init__(self, client_app: ClientApp, message: Message, context: Context) -> None:
        self.client_app, self.message, self.context = client_app, message, context
        self.reply: Message | None = None
        self.error: BaseException | None = None
        self.timed_out = False

    def run(self) -> None:
        try:
            self.reply = self.client_app(self.message, self.context)
        except BaseException as error:  # SystemExit too: a client cannot end the simulation
            self.error = error

    def run_within(self, seconds: float) -> None:
        """``run`` in a daemon thread; after ``seconds`` give up on it and ask it to stop."""
        thread = threading.Thread(target=self.run, name="pollen-client", daemon=True)
        thread.start()
        thread.join(seconds)
        if thread.is_alive():
            self.timed_out = True
            # Raised in the thread at its next Python instruction (see the module docstring).
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident),
                                                        ctypes.py_object(ClientTimedOut))


class ClientTimedOut(BaseException):
    """Raised inside a client's thread once its time is up, to stop it."""


def server_round_of(message: Message) -> int:
    """The round a train or evaluate message belongs to (0 for other messages)."""
    config = message.content.config_records.get("config")
    return int(config.get("server-round", 0)) if config is not None else 0
