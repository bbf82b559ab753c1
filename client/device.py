"""The device side of a deployed federation: a Flower SuperNode that trains on local files.

``supernode_command(...)`` is the ``flower-supernode`` command line ``pollen client``
becomes: TLS against the federation's CA, the device's private key for node
authentication, and the node config the ClientApp reads (``client/app.py``):
``data-path`` (the device's files, see ``client/local_files.py``) and ``partition-id``,
a number fixed by the device key that seeds this device's local shuffling.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from pollen.flower_processes import console_script

DEFAULT_LOCAL_PORT = 9094  # the SuperNode's port for its ClientApp processes, on 127.0.0.1


class DeviceError(ValueError):
    """A device setting is wrong; the message names the file or value."""


def device_number(key_path: Path) -> int:
    """A stable number for this device, from its public key: distinct devices, distinct seeds."""
    try:
        private = serialization.load_ssh_private_key(Path(key_path).read_bytes(), password=None)
    except (OSError, ValueError) as error:
        raise DeviceError(f"{key_path}: not a device private key from `pollen certs` ({error})") from None
    public = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return zlib.crc32(public) & 0x7FFFFFFF


def check_server(server: str) -> tuple[str, int]:
    host, sep, port = server.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DeviceError(f"--server {server!r}: expected HOST:PORT, e.g. fl.example.org:9093")
    return host, int(port)


def supernode_command(server: str, data: Path, ca: Path | None, key: Path | None,
                      local_port: int = DEFAULT_LOCAL_PORT) -> list[str]:
    """The ``flower-supernode`` command for this device (``ca`` None: plain HTTP, ``--insecure``)."""
    from pollen.client.app import DATA_PATH

    check_server(server)
    command = [console_script("flower-supernode"), "--superlink", server, "--port", str(local_port)]
    if ca is None:
        command.append("--insecure")
    else:
        if not Path(ca).is_file():
            raise DeviceError(f"--ca {ca}: no such file (the federation's ca.pem)")
        command += ["--root-certificates", str(Path(ca).resolve())]
    partition = 0
    if key is not None:
        if not Path(key).is_file():
            raise DeviceError(f"--key {key}: no such file (this device's key from `pollen certs`)")
        partition = device_number(key)
        command += ["--auth-supernode-private-key", str(Path(key).resolve())]
    data = str(Path(data).expanduser().resolve())
    if '"' in data:
        raise DeviceError(f"--data {data}: a path with a double quote cannot be passed to Flower")
    # json.dumps quotes the path as a TOML basic string, which is how Flower parses node config
    command += ["--node-config", f"{DATA_PATH}={json.dumps(data)} partition-id={partition}"]
    return command
