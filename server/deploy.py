"""The server side of a deployed federation: Flower's SuperLink behind the Fleet proxy.

``Deployment(config, folder, certs).start()`` then ``.submit()`` does what an operator
would do by hand with Flower's tools:

1. start ``flower-superlink`` on 127.0.0.1 only, on an internal port, with the server
   certificate and ``--enable-supernode-auth`` (only registered device keys may connect):
   Flower serves its Control API (``flwr run``, ``ls``, ``stop``) on that same port, so
   that port must not face the network;
2. ``flwr supernode register`` every device public key in ``CERTS/devices/``, through
   that internal address;
3. start the Fleet proxy (``pollen.server.fleet_proxy``) on the public host and port:
   TLS with the same certificate, Flower's Fleet routes only, bounded requests; it opens
   after the keys are registered, so an early device waits instead of being refused;
4. ``flwr run`` a Flower App whose ``pyproject.toml`` carries this run's whole config,
   so the SuperLink runs the same ServerApp (``pollen.server.app:app``) the simulations
   use and devices run the same ClientApp (``pollen.client.app:app``) from their
   installed Pollen;
5. while it runs, keep the registered keys in step with ``CERTS/devices/`` every poll
   (``sync_devices``): a key that left (``pollen certs --revoke``) is unregistered with
   ``flwr supernode unregister``, after which Flower's Fleet node-auth middleware refuses
   every request signed with it; a new key (``pollen certs --add-devices``) is registered.

Before anything starts, ``check_ports`` refuses a port already in use, and the
certificates are checked: missing or expired is an error, expiring soon a warning. A
process that dies at start-up is reported at once with the reason from its log.

Flower's CLI keeps its connection settings under ``FLWR_HOME``; each run gets its own,
inside the run folder, so nothing in the user's home is touched. The SuperLink, what it
spawns, and the proxy are processes started and stopped by PID (``pollen.flower_processes``).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.supercore.constant import NodeStatus

from pollen.certs import (CA_CERT, DEVICES, SERVER_CERT, SERVER_KEY, CertificateError, expiry_warning,
                          server_names_of)
from pollen.config import Config, run_config_of
from pollen.flower_processes import (CONNECTION, SUPERLINK_LOG, FlowerError, ProcessTree, console_script, free_port,
                                     offline_env, port_problem, wait_until_ready, write_app, write_connection)
from pollen.run_folder import RunFolder
from pollen.server.fleet_proxy import ProxySettings, RequestLimits

DEFAULT_PORT = 9093
LOCALHOST = "127.0.0.1"  # where the SuperLink listens: its Control API is for this machine only
PROXY_LOG = "fleet-proxy.log"
# Above the dense update: a push carries one object of a message plus its protobuf
# envelope and ids, and the other Fleet calls are a few kB.
REQUEST_MARGIN_BYTES = 1 << 20
# Set in the environment, these would make the SuperLink also open its legacy gRPC Control
# and Fleet APIs, on 0.0.0.0 by default, past the proxy.
LEGACY_GRPC_SWITCHES = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API")
SERVERAPP, CLIENTAPP = "pollen.server.app:app", "pollen.client.app:app"
CALL_SECONDS = 30.0  # one `flwr` call may take this long (it starts a Python process) before it is given up


class DeploymentError(FlowerError):
    """The federation could not be started or run; the message says which step failed."""


def superlink_command(host: str, port: int, certs: Path | None, node_auth: bool) -> list[str]:
    command = [console_script("flower-superlink"), "--host", host, "--port", str(port),
               "--disable-runtime-dependency-installation"]
    if certs is None:
        command.append("--insecure")
    else:
        command += ["--ssl-ca-certfile", str(certs / CA_CERT), "--ssl-certfile", str(certs / SERVER_CERT),
                    "--ssl-keyfile", str(certs / SERVER_KEY)]
    if node_auth:
        command.append("--enable-supernode-auth")
    return command


@dataclass(frozen=True)
class DeviceKey:
    """One ``devices/*.pub`` as read: Flower knows a node by its public key, people by its name."""

    name: str  # the file's stem: device-3
    path: Path
    text: str  # the OpenSSH public key line


def device_keys(certs: Path) -> list[DeviceKey]:
    """The device public keys now in ``certs/devices/``, by name."""
    keys = []
    for path in sorted((certs / DEVICES).glob("*.pub")):
        try:
            keys.append(DeviceKey(path.stem, path, path.read_text(errors="replace").strip()))
        except FileNotFoundError:  # revoked between the listing and the read
            pass
    return keys


def check_certificates(certs: Path) -> list[str]:
    """Refuse a certs folder ``pollen server`` cannot use; the warnings (one line each) for one it can."""
    if not certs.is_dir():
        raise DeploymentError(f"--certs {certs}: no such folder; create it with "
                              f"`pollen certs {certs} --server-name HOST`")
    for name in (CA_CERT, SERVER_CERT, SERVER_KEY):
        if not (certs / name).is_file():
            raise DeploymentError(f"{certs / name}: missing; create the certificates with "
                                  f"`pollen certs {certs} --server-name HOST`")
    if not device_keys(certs):
        raise DeploymentError(f"{certs / DEVICES}: no device public keys (*.pub); create them with "
                              f"`pollen certs {certs} --add-devices N`")
    try:
        names = server_names_of(certs / SERVER_CERT)
    except ValueError as error:
        raise DeploymentError(f"{certs / SERVER_CERT}: unreadable ({error})") from None
    if LOCALHOST not in names:
        raise DeploymentError(f"{certs / SERVER_CERT} is not valid for {LOCALHOST}, the address the SuperLink "
                              f"listens on behind the Fleet proxy (valid for {', '.join(names)})")
    remedies = {SERVER_CERT: f"renew it with `pollen certs {certs} --renew-server`",
                CA_CERT: f"a new CA is `pollen certs {certs} --force --server-name HOST` and its ca.pem and a new "
                         "key on every device"}
    try:
        return [line for name, remedy in remedies.items() if (line := expiry_warning(certs / name, remedy))]
    except CertificateError as error:
        raise DeploymentError(str(error)) from None


def dense_update_bytes(config: Config) -> int:
    """Bytes on the wire of one dense fp32 update of the run's trainable arrays."""
    from pollen.codec import dense_wire_bytes, layout_of
    from pollen.data import num_classes
    from pollen.models import initial_arrays

    return dense_wire_bytes(layout_of(initial_arrays(config.model, num_classes(config.data), config.seed)))


def default_max_request_bytes(config: Config) -> int:
    """The largest request a device needs: its whole update sent dense, plus the envelope."""
    return dense_update_bytes(config) + REQUEST_MARGIN_BYTES


@dataclass
class Deployment:
    """One federation run on a SuperLink started here; use as a context manager to stop it."""

    config: Config
    folder: Path  # the run folder: records, checkpoint, logs, Flower's settings
    certs: Path | None  # None: plain HTTP, no node authentication (--insecure)
    host: str | None = None  # where devices connect; None: every address, or 127.0.0.1 when insecure
    port: int = DEFAULT_PORT
    resume: bool = False
    limits: RequestLimits = field(default_factory=RequestLimits)  # max_request_bytes None: sized to the model
    internal_port: int | None = None  # the SuperLink's, on 127.0.0.1; None: a free one
    superlink: ProcessTree | None = None
    proxy: ProcessTree | None = None
    run_id: int | None = None
    node_ids: dict[DeviceKey, int] = field(default_factory=dict)  # the registered keys, Flower's node id of each
    refused: set[DeviceKey] = field(default_factory=set)  # registration failed: tried again once the file changes
    warnings: list[str] = field(default_factory=list)  # one line each, for whoever starts it to show

    def __post_init__(self) -> None:
        self.folder = self.folder.resolve()
        self.flwr_home = self.folder / "flwr"
        if self.host is None:
            self.host = LOCALHOST if self.certs is None else "0.0.0.0"
        if self.certs is not None:
            self.certs = self.certs.resolve()
            self.warnings = check_certificates(self.certs)

    @property
    def local_host(self) -> str:
        """Where this machine reaches the proxy."""
        return LOCALHOST if self.host in ("0.0.0.0", "::", "") else self.host

    @property
    def internal_address(self) -> str:
        """The SuperLink with every API, Control included: for this machine's ``flwr`` only."""
        return f"{LOCALHOST}:{self.internal_port}"

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def check_ports(self) -> None:
        """Refuse, before anything starts, a public or internal port something already listens on."""
        while self.internal_port in (None, self.port):
            self.internal_port = free_port()
        for host, port, what in ((self.host, self.port, "--port"),
                                 (LOCALHOST, self.internal_port, "the SuperLink's internal port")):
            if problem := port_problem(host, port):
                raise DeploymentError(f"{what} {port} on {host}: {problem}; stop what listens there or "
                                      f"choose another port")

    def start(self, timeout: float = 60.0) -> None:
        """Start the SuperLink, register the device keys, then open the Fleet proxy to devices."""
        self.check_ports()
        self.folder.mkdir(parents=True, exist_ok=True)
        logs = RunFolder(self.folder).logs
        ca = None if self.certs is None else self.certs / CA_CERT
        write_connection(self.flwr_home, self.internal_address, ca)
        command = superlink_command(LOCALHOST, self.internal_port, self.certs, node_auth=self.certs is not None)
        env = {**offline_env(self.flwr_home), **RunFolder.environment(self.folder, self.resume)}
        for name in LEGACY_GRPC_SWITCHES:
            env.pop(name, None)
        self.superlink = ProcessTree.start(command, logs / SUPERLINK_LOG, env, cwd=self.folder, name="the SuperLink")
        deadline = time.monotonic() + timeout
        if self.limits.max_request_bytes is None:  # builds the model: done while the SuperLink starts
            self.limits = dataclasses.replace(self.limits, max_request_bytes=default_max_request_bytes(self.config))
        wait_until_ready(LOCALHOST, self.internal_port, self.superlink, timeout)
        for key in [] if self.certs is None else device_keys(self.certs):
            self.node_ids[key] = self.register(key, deadline)
        self.write_device_names()
        self.proxy = ProcessTree.start(self.proxy_settings().command(), logs / PROXY_LOG, offline_env(),
                                       cwd=self.folder, name="the Fleet proxy")
        wait_until_ready(self.local_host, self.port, self.proxy, max(5.0, deadline - time.monotonic()))
        self.check_running()  # something else may have answered on the port while the proxy failed to bind

    def register(self, key: DeviceKey, deadline: float) -> int:
        """Register one device key with the SuperLink; Flower's node id for it."""
        return int(self.flwr(["supernode", "register", str(key.path), CONNECTION], deadline)["node-id"])

    def sync_devices(self) -> list[str]:
        """Bring the registered keys in step with ``certs/devices/``; one line per change.

        A key that left is unregistered: Flower marks its node UNREGISTERED, so every later
        request signed with it is refused (401) and a message addressed to it gets an error
        reply. A key that appeared is registered. Flower keeps an unregistered key on record,
        so the same key cannot be registered again on this SuperLink.
        """
        if self.certs is None:
            return []
        on_disk = set(device_keys(self.certs))
        changes = []
        for key in [key for key in self.node_ids if key not in on_disk]:
            node_id = self.node_ids[key]
            try:
                self.flwr(["supernode", "unregister", str(node_id), CONNECTION], time.monotonic())
            except DeploymentError as error:
                if self.nodes().get(node_id, NodeStatus.UNREGISTERED) != NodeStatus.UNREGISTERED:
                    changes.append(f"{key.name}: could not unregister node {node_id}, trying again: {error}")
                    continue  # still admitted: try again next poll
            del self.node_ids[key]
            changes.append(f"{key.name}: unregistered (node {node_id}); its requests are refused from now on")
        self.refused &= on_disk
        for key in sorted(on_disk - set(self.node_ids) - self.refused, key=lambda key: key.name):
            try:
                self.node_ids[key] = self.register(key, time.monotonic())
                changes.append(f"{key.name}: registered (node {self.node_ids[key]})")
            except DeploymentError as error:
                self.refused.add(key)
                changes.append(f"{key.name}: not registered: {error}")
        if changes:
            self.write_device_names()
        return changes

    def write_device_names(self) -> None:
        """``devices.json``: the ServerApp names a rejected or clipped node by its key (device-3), not its id."""
        names = {str(node_id): key.name for key, node_id in sorted(self.node_ids.items(), key=lambda kv: kv[1])}
        RunFolder(self.folder).devices.write_text(json.dumps(names, indent=2) + "\n")

    def nodes(self) -> dict[int, str]:
        """Every node the SuperLink knows and its status (NodeStatus: online, unregistered, ...)."""
        reply = self.flwr(["supernode", "list", CONNECTION], time.monotonic())
        return {int(node["node-id"]): node["status"] for node in reply["nodes"]}

    def proxy_settings(self) -> ProxySettings:
        scheme = "http" if self.certs is None else "https"
        upstream = f"{scheme}://{self.internal_address}"
        if self.certs is None:
            return ProxySettings(self.host, self.port, upstream, self.limits)
        return ProxySettings(self.host, self.port, upstream, self.limits, certfile=self.certs / SERVER_CERT,
                             keyfile=self.certs / SERVER_KEY, upstream_ca=self.certs / CA_CERT)

    def submit(self, timeout: float = 60.0) -> int:
        """Submit the Pollen app for the configured rounds; returns Flower's run id.

        The run's config carries ``data.num_classes`` counted here when it is 0: devices
        hold their own data, not the server's ``data.dataset``, and cannot count it.
        """
        from pollen.data import num_classes

        config = self.config
        if not config.data.num_classes:
            config = dataclasses.replace(config, data=dataclasses.replace(config.data,
                                                                          num_classes=num_classes(config.data)))
        app = write_app(self.folder / "app", SERVERAPP, CLIENTAPP, run_config_of(config))
        reply = self.flwr(["run", str(app), CONNECTION], time.monotonic() + timeout)
        self.run_id = int(reply["run-id"])
        return self.run_id

    def status(self) -> dict[str, Any]:
        """Flower's view of the run: status, bytes in and out, compute seconds."""
        reply = self.flwr(["list", CONNECTION, "--run-id", str(self.run_id)], time.monotonic() + 30)
        return reply["runs"][0]

    def wait(self, timeout: float | None = None, on_poll: Callable[[], None] | None = None,
             poll: float = 2.0, on_change: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Block until the run finishes; returns its final status. Raises if it failed.

        Every ``poll`` seconds the device keys are synced (``sync_devices``); ``on_change``
        gets each line that reports a change.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if on_poll:
                on_poll()
            for change in self.sync_devices():
                if on_change:
                    on_change(change)
            status = self.status()
            if status["status"].startswith("finished"):
                if on_poll:
                    on_poll()
                if status["status"] != "finished:completed":
                    details = str(status.get("status-details") or "").strip().splitlines()
                    raise DeploymentError(f"run {self.run_id} ended {status['status']}: "
                                          f"{details[0] if details else 'no details'}; see `FLWR_HOME={self.flwr_home} "
                                          f"flwr log {self.run_id} {CONNECTION}` and {self.superlink.log}")
                return status
            self.check_running()
            for process in (self.superlink, self.proxy):
                if process is not None:
                    process.remember_children()
            if deadline is not None and time.monotonic() > deadline:
                raise DeploymentError(f"run {self.run_id} did not finish within {timeout:.0f} s")
            time.sleep(poll)

    def stop(self) -> None:
        """Close the devices' door first, then the SuperLink and what it spawned."""
        for process in (self.proxy, self.superlink):
            if process is not None:
                process.stop()

    def check_running(self) -> None:
        """Raise, with the reason from its log, if the SuperLink or the proxy has exited."""
        for process in (self.superlink, self.proxy):
            if process is not None and not process.running():
                raise DeploymentError(process.exit_report())

    def flwr(self, args: list[str], deadline: float) -> dict[str, Any]:
        """Run one ``flwr`` CLI command with JSON output, retrying until ``deadline`` (the SuperLink
        may be warming up); a deadline already past means one attempt."""
        command = f"`flwr {' '.join(args)}`"
        while True:
            self.check_running()  # a dead SuperLink answers no retry: say so now, not at the deadline
            seconds = max(CALL_SECONDS, deadline - time.monotonic())
            try:
                done = subprocess.run([console_script("flwr"), *args, "--format", "json"], capture_output=True,
                                      text=True, env=offline_env(self.flwr_home), cwd=self.folder, timeout=seconds)
            except subprocess.TimeoutExpired:
                self.check_running()
                raise DeploymentError(f"{command} did not answer within {seconds:.0f} s"
                                      + ("" if self.superlink is None else f"; see {self.superlink.log}")) from None
            try:
                reply = json.loads(done.stdout)
            except json.JSONDecodeError:
                reply = {"success": False, "error-message": (done.stdout + done.stderr).strip()[-500:]}
            if reply.get("success"):
                return reply
            if time.monotonic() > deadline:
                message = " ".join(str(reply.get("error-message", reply)).split())
                raise DeploymentError(f"{command} failed: {message}")
            time.sleep(0.5)

