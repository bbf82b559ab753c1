"""The client's copy of the global trainable arrays, kept in ``Context.state``.

With downlink compression the server sends only what a client lacks (see
``pollen/downlink.py``); the client rebuilds the global arrays from its copy, or from
the initial arrays when the payload starts at version 0, and keeps the result for
next time. Without it, every message carries the dense arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from pollen.codec import CodecError, Identity, TopK, decode
from pollen.downlink import PREFIX, DownlinkError, payload_base, rebuild


class GlobalCopy:
    """``GlobalCopy(context.state, initial, step_codec).receive(arrays, config)`` -> the global arrays."""

    ARRAYS = "global-copy"
    VERSION = "global-version"

    def __init__(self, state: RecordDict, initial: Callable[[], Mapping[str, np.ndarray]],
                 step_codec: TopK | None) -> None:
        self.state = state
        self.initial = initial  # version 0: the arrays every run with this seed starts from
        self.step_codec = step_codec  # how the server codes its steps; None: dense arrays only

    def held(self) -> tuple[dict[str, np.ndarray], int]:
        record = self.state.array_records.get(self.ARRAYS)
        if record is None:
            return dict(self.initial()), 0
        return {name: array.numpy() for name, array in record.items()}, int(self.state[self.VERSION]["version"])

    def receive(self, record: ArrayRecord, config: Mapping) -> dict[str, np.ndarray]:
        """The global arrays this message stands for; kept when they came compressed."""
        initial = self.initial()  # built once per message: it is the layout, version 0 and what resets restore
        layout = {name: value.shape for name, value in initial.items()}
        if f"{PREFIX}kind" not in config or self.step_codec is None:  # dense fp32, checked like any payload
            try:
                return decode(record, layout, Identity())
            except CodecError as error:
                raise DownlinkError(f"bad global arrays: {error}") from None
        if payload_base(config) == 0:  # the change since the initial arrays, whatever this copy holds
            held, version = dict(initial), 0
        else:
            held, version = self.held()
        arrays, version = rebuild(record, config, layout, self.step_codec, held, version, initial)
        self.state[self.ARRAYS] = ArrayRecord({name: Array(np.ascontiguousarray(value, dtype=np.float32))
                                               for name, value in arrays.items()})
        self.state[self.VERSION] = ConfigRecord({"version": version})
        return arrays

