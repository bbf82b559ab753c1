"""Downlink wire format: how the global trainable arrays reach a client.

The server's global arrays move by one compressed *step* per round (see
``server/broadcast.py``), so anyone holding version v can rebuild version t
exactly from the steps v+1..t. A client gets either

    chain   the steps it lacks, each a ``pollen.codec`` TopK payload ("step-<v>")
    full    the whole arrays at 8 bits with a scale per block of 256 ("full"),
            when the chain would cost more (or the server does not know its version)

and the train/evaluate ConfigRecord says which (``downlink.kind``) and from which
version to which (``downlink.base``, ``downlink.version``); how the steps are coded
is the run config's ``downlink`` section, which both sides hold. Every client starts at
version 0, the initial arrays built from the run's seed; ``downlink.base-crc``
lets it check that its version 0 is the server's.

A full transfer is within half a quantization step of the global arrays; the
offset it leaves is not compounded by later chains, which are exact.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from pollen.codec import CodecError, Layout, TopK, decode, encode

FULL = TopK(density=1.0, bits=8, block=256)
PREFIX = "downlink."


class DownlinkError(ValueError):
    """The client cannot rebuild the global arrays from what it was sent."""


def arrays_crc(arrays: Mapping[str, np.ndarray]) -> int:
    """CRC-32 of names and float32 bytes: do two parties hold the same arrays?"""
    crc = 0
    for name, value in arrays.items():
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(np.ascontiguousarray(value, dtype=np.float32).tobytes(), crc)
    return crc


def step_name(version: int) -> str:
    return f"step-{version}"


def chain_message(steps: Mapping[int, ArrayRecord], base: int, version: int,
                  base_crc: int | None = None) -> tuple[ArrayRecord, dict]:
    """(payload, config entries) carrying the steps ``base+1..version``."""
    record = ArrayRecord({step_name(v): steps[v]["update"] for v in range(base + 1, version + 1)})
    config = {f"{PREFIX}kind": "chain", f"{PREFIX}base": base, f"{PREFIX}version": version}
    if base_crc is not None:
        config[f"{PREFIX}base-crc"] = base_crc
    return record, config


def full_message(arrays: Mapping[str, np.ndarray], version: int) -> tuple[ArrayRecord, dict]:
    """(payload, config entries) carrying the whole arrays at 8 bits."""
    record = ArrayRecord({"full": encode(arrays, FULL)["update"]})
    return record, {f"{PREFIX}kind": "full", f"{PREFIX}version": version}


def rebuild(record: ArrayRecord, config: Mapping, layout: Layout, step_codec: TopK,
            held: Mapping[str, np.ndarray] | None, held_version: int | None
            ) -> tuple[dict[str, np.ndarray], int]:
    """The global arrays and their version, from a downlink payload and what the client holds.

    ``step_codec`` is how the server codes its steps (``downlink.*`` of the run config).
    ``held`` is the client's copy at ``held_version`` (for version 0 it may be the
    initial arrays). Raises ``DownlinkError`` when the payload does not fit them.
    """
    kind = config.get(f"{PREFIX}kind")
    version = _int(config, f"{PREFIX}version")
    try:
        if kind == "full":
            _expect_keys(record, ["full"])
            return decode(_blob(record["full"]), layout, FULL), version
        if kind != "chain":
            raise DownlinkError(f"unknown downlink kind {kind!r}")
        base = _int(config, f"{PREFIX}base")
        if held is None or held_version != base:
            raise DownlinkError(f"server sent steps from version {base}, this client holds "
                                f"{'nothing' if held is None else f'version {held_version}'}")
        expected_crc = config.get(f"{PREFIX}base-crc")
        if base == 0 and expected_crc is not None and expected_crc != arrays_crc(held):
            raise DownlinkError("this client's initial arrays differ from the server's "
                                "(different seed, model or library version?)")
        if not 0 <= base <= version:
            raise DownlinkError(f"bad version range {base}..{version}")
        _expect_keys(record, [step_name(v) for v in range(base + 1, version + 1)])
        arrays = {name: np.array(value, dtype=np.float32) for name, value in held.items()}
        for blob in record.values():
            for tensor, step in decode(_blob(blob), layout, step_codec).items():
                arrays[tensor] += step
        return arrays, version
    except CodecError as error:
        raise DownlinkError(f"bad downlink payload: {error}") from None


def _int(config: Mapping, key: str) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DownlinkError(f"{key} missing or not a non-negative integer: {value!r}")
    return value


def _expect_keys(record: ArrayRecord, keys: list[str]) -> None:
    if list(record.keys()) != keys:
        raise DownlinkError(f"expected arrays {keys[:3]}{'...' if len(keys) > 3 else ''}, "
                            f"got {list(record.keys())[:3]}")


def _blob(array: Array) -> ArrayRecord:
    return ArrayRecord({"update": array})
