"""Downlink wire format: how the global trainable arrays reach a client.

The server's global arrays move by one compressed *step* per round (see
``server/broadcast.py``), so anyone holding version v can rebuild version t from
the steps v+1..t. A client gets one of

    chain   the steps it lacks, each a ``pollen.codec`` TopK payload ("step-<v>"):
            exact, cheapest when it missed a step or two; under a budget
            (``downlink.budget``) a step may also name entries that go back to their
            initial values ("reset-<v>", their positions only), applied after its values
    sum     their sum as ONE payload ("sum"): the change since its version on the
            union of the steps' supports, at the steps' bits with a scale per block
            of 256 (``sum_codec``);
            from version 0 it is the change since the initial arrays, so a first
            contact (or a client whose version is unknown) costs what changed, not
            the whole arrays

and the train/evaluate ConfigRecord says which (``downlink.kind``) and from which
version to which (``downlink.base``, ``downlink.version``); how the steps are coded
is the run config's ``downlink`` section, which both sides hold. Version 0 is the
initial arrays built from the run's seed, which every client can rebuild at any time:
a payload from base 0 is applied to them, whatever the client held before, and
``downlink.base-crc`` lets it check that its version 0 is the server's.

A sum is within half a quantization step of the change it carries, a small share of
the arrays' own size (what the whole arrays at 8 bits would be off by); chains add no
error of their own.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from pollen.codec import CodecError, Layout, TopK, decode, encode

PREFIX = "downlink."
KINDS = ("chain", "sum")


class DownlinkError(ValueError):
    """The client cannot rebuild the global arrays from what it was sent."""


def arrays_crc(arrays: Mapping[str, np.ndarray]) -> int:
    """CRC-32 of names and float32 bytes: do two parties hold the same arrays?"""
    crc = 0
    for name, value in arrays.items():
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(np.ascontiguousarray(value, dtype=np.float32).tobytes(), crc)
    return crc


def sum_codec(step_codec: TopK) -> TopK:
    """How a sum is coded: every nonzero entry (top-k at density 1), at the steps' bits, a scale per 256 values."""
    return TopK(density=1.0, bits=step_codec.bits, block=256)


RESET = TopK(density=1.0, bits=1)  # positions only: every kept value is +1, one sign bit each


def step_name(version: int) -> str:
    return f"step-{version}"


def reset_name(version: int) -> str:
    return f"reset-{version}"


def _entries(kind: str, base: int, version: int, base_crc: int | None) -> dict:
    config = {f"{PREFIX}kind": kind, f"{PREFIX}base": base, f"{PREFIX}version": version}
    if base == 0 and base_crc is not None:
        config[f"{PREFIX}base-crc"] = base_crc
    return config


def chain_message(steps: Mapping[int, ArrayRecord], base: int, version: int,
                  base_crc: int | None = None) -> tuple[ArrayRecord, dict]:
    """(payload, config entries) carrying the steps ``base+1..version`` (each with its resets, if any)."""
    record = ArrayRecord()
    for v in range(base + 1, version + 1):
        record[step_name(v)] = steps[v]["update"]
        if "reset" in steps[v]:
            record[reset_name(v)] = steps[v]["reset"]
    return record, _entries("chain", base, version, base_crc)


def sum_message(change: Mapping[str, np.ndarray], base: int, version: int, step_codec: TopK,
                base_crc: int | None = None) -> tuple[ArrayRecord, dict]:
    """(payload, config entries) carrying ``change`` = version's arrays - base's, as one payload."""
    record = ArrayRecord({"sum": encode(change, sum_codec(step_codec))["update"]})
    return record, _entries("sum", base, version, base_crc)


def rebuild(record: ArrayRecord, config: Mapping, layout: Layout, step_codec: TopK,
            held: Mapping[str, np.ndarray], held_version: int,
            initial: Mapping[str, np.ndarray] | None = None) -> tuple[dict[str, np.ndarray], int]:
    """The global arrays and their version, from a downlink payload and what the client holds.

    ``step_codec`` is how the server codes its steps (``downlink.*`` of the run config).
    ``held`` is the client's copy at ``held_version``; for a payload from version 0
    (see ``payload_base``) it must be the initial arrays, which a chain with resets
    needs as ``initial``. Raises ``DownlinkError`` when the payload does not fit them.
    """
    kind = config.get(f"{PREFIX}kind")
    if kind not in KINDS:
        raise DownlinkError(f"unknown downlink kind {kind!r}")
    version = _int(config, f"{PREFIX}version")
    base = payload_base(config)
    if held_version != base:
        raise DownlinkError(f"server sent the change from version {base}, this client holds version {held_version}")
    expected_crc = config.get(f"{PREFIX}base-crc")
    if base == 0 and expected_crc is not None and expected_crc != arrays_crc(held):
        raise DownlinkError("this client's initial arrays differ from the server's "
                            "(different seed, model or library version?)")
    if base > version:
        raise DownlinkError(f"bad version range {base}..{version}")
    names = ["sum"]
    if kind == "chain":
        names = [name for v in range(base + 1, version + 1)
                 for name in (step_name(v), reset_name(v)) if name == step_name(v) or name in record]
    _expect_keys(record, names)
    if initial is None and any(name.startswith("reset-") for name in names):
        raise DownlinkError("a step with resets needs the initial arrays")
    arrays = {name: np.array(value, dtype=np.float32) for name, value in held.items()}
    codec = step_codec if kind == "chain" else sum_codec(step_codec)
    try:
        for name, blob in record.items():
            if name.startswith("reset-"):  # these entries go back to their initial values
                for tensor, mask in decode(_blob(blob), layout, RESET).items():
                    arrays[tensor][mask != 0] = initial[tensor][mask != 0]
                continue
            for tensor, change in decode(_blob(blob), layout, codec).items():
                arrays[tensor] += change
    except CodecError as error:
        raise DownlinkError(f"bad downlink payload: {error}") from None
    return arrays, version


def payload_base(config: Mapping) -> int:
    """The version a downlink payload starts from (0: the initial arrays)."""
    return _int(config, f"{PREFIX}base")


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
