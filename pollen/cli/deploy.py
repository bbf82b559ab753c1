"""``pollen certs | server | client | export``: run a federation on real devices.

Kept apart from ``pollen.cli`` so the simulation commands stay readable; the server,
client and export code is imported inside each command (``pollen`` imports none of
those packages at module level).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from pollen.config import ConfigError, load_config

COMMANDS = ("certs", "server", "client", "export")
LOCAL_NAMES = ["localhost", "127.0.0.1"]  # the server's own `flwr` calls reach the SuperLink here


def add_commands(commands: argparse._SubParsersAction) -> None:
    certs = commands.add_parser("certs", help="create a CA, the server certificate and device keys")
    certs.add_argument("folder", help="where to write them (created; private keys are owner-only)")
    certs.add_argument("--server-name", action="append", required=True, metavar="HOST",
                       help="a host name or IP address devices dial (repeatable); "
                            "localhost and 127.0.0.1 are always added")
    certs.add_argument("--devices", type=int, default=3, help="device key pairs to create (default 3)")
    certs.add_argument("--force", action="store_true", help="replace existing files")

    server = commands.add_parser("server", help="run the federation's server (Flower SuperLink + Pollen)")
    server.add_argument("--config", help="YAML config (default: the built-in default run)")
    server.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key (repeatable)")
    server.add_argument("--certs", help="folder from `pollen certs`: TLS and the device keys to admit")
    server.add_argument("--host", default=None,
                        help="address devices connect to (default: every address; 127.0.0.1 with --insecure)")
    server.add_argument("--port", type=int, default=None, help="port devices connect to (default 9093)")
    server.add_argument("--max-request-bytes", type=int, default=None,
                        help="largest request a device may send (default: the model's dense update + 1 MiB)")
    # Defaults are pollen.server.fleet_proxy.RequestLimits' (not imported here: see the module docstring).
    server.add_argument("--rate-limit", type=float, default=None, metavar="PER_SECOND",
                        help="requests a second per device address (default 20)")
    server.add_argument("--rate-burst", type=int, default=None,
                        help="requests a device address may make at once (default 400)")
    server.add_argument("--output", help="run folder (default: OUTPUT_DIR/<timestamp>)")
    server.add_argument("--resume", metavar="RUN_DIR", help="go on from RUN_DIR's last checkpoint")
    server.add_argument("--insecure", action="store_true",
                        help="plain HTTP and no device authentication (only on a trusted network)")
    server.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")

    client = commands.add_parser("client", help="run a device: a Flower SuperNode training on local data")
    client.add_argument("--server", required=True, help="HOST:PORT of the server")
    client.add_argument("--ca", help="the federation's ca.pem")
    client.add_argument("--key", help="this device's private key (devices/device-N.key)")
    client.add_argument("--data", required=True,
                        help="training data: a folder of class folders 0/, 1/, ... of images, or an .npz/.csv file")
    client.add_argument("--local-port", type=int, default=None,
                        help="port on 127.0.0.1 for the SuperNode's ClientApp (default 9094; "
                             "give each SuperNode on one machine its own)")
    client.add_argument("--insecure", action="store_true", help="plain HTTP (a server started with --insecure)")

    export = commands.add_parser("export", help="write a run's fine-tuned model for on-device inference")
    export.add_argument("run", help="run folder holding checkpoint.pt and config.yaml")
    export.add_argument("--format", choices=("onnx", "torch", "peft"), default="onnx",
                        help="onnx or torch: the merged model; peft: adapters and head as a peft adapter folder")
    export.add_argument("--output", help="file or (peft) folder to write "
                                         "(default: RUN/model.onnx, RUN/model.pt2 or RUN/peft-adapter)")


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        return {"certs": certs_command, "server": server_command, "client": client_command,
                "export": export_command}[args.command](args)
    except ConfigError as error:
        parser.exit(2, f"pollen: config error: {error}\n")
    except ValueError as error:  # every bad-input error of these commands is a ValueError
        parser.exit(2, f"pollen {args.command}: {error}\n")


def certs_command(args: argparse.Namespace) -> int:
    from pollen.certs import make_certificates

    names = list(dict.fromkeys([*args.server_name, *LOCAL_NAMES]))
    paths = make_certificates(args.folder, names, devices=args.devices, force=args.force)
    print(f"CA:      {paths.ca_cert}  (copy to every device)")
    print(f"server:  {paths.server_cert}, {paths.server_key}  (valid for {', '.join(names)})")
    print(f"devices: {len(paths.device_keys)} key pairs in {paths.folder / 'devices'}; copy device-N.key to "
          "device N, keep the .pub files here: the server admits exactly those")
    return 0


def server_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    from pollen.flower_processes import CONNECTION, FlowerError
    from pollen.run_folder import RunFolder
    from pollen.server.deploy import DEFAULT_PORT, Deployment
    from pollen.server.fleet_proxy import RequestLimits

    console = Console()
    if args.resume:
        run = RunFolder(args.resume)
        if not run.config_path.is_file():
            raise ConfigError(f"--resume {run}: no {RunFolder.CONFIG}, not a run folder")
        config = run.read_config(args.overrides)
    else:
        config = load_config(args.config, args.overrides)
        run = RunFolder(args.output) if args.output else RunFolder.new(config.output_dir)
    if not args.insecure and not args.certs:
        raise ValueError("--certs DIR is required (create it with `pollen certs DIR --server-name HOST`), "
                         "or pass --insecure")
    given = {"max_request_bytes": args.max_request_bytes, "requests_per_second": args.rate_limit,
             "burst": args.rate_burst}
    limits = RequestLimits(**{name: value for name, value in given.items() if value is not None})
    certs = None if args.insecure else Path(args.certs)
    deployment = Deployment(config, run.path, certs, host=args.host, port=args.port or DEFAULT_PORT,
                            resume=bool(args.resume), limits=limits)
    if args.insecure:
        reach = ("listening on 127.0.0.1 only; pass --host to open it to a network you trust"
                 if args.host is None else f"listening on {deployment.host}: anyone who reaches it may join")
        console.print(f"[bold red]WARNING[/]: --insecure: updates travel unencrypted and any device may join; "
                      f"{reach}.")
    fed = config.federation
    started = time.monotonic()
    with deployment:
        try:
            deployment.start()
            limits = deployment.limits
            door = f"TLS, {len(deployment.public_keys)} registered device keys" if certs else "insecure"
            console.print(f"[bold]pollen server[/]: devices connect to {deployment.host}:{deployment.port}, Fleet API "
                          f"only ({door}; requests up to {limits.max_request_bytes} B, "
                          f"{limits.requests_per_second:g}/s and {limits.burst} at once per address)")
            console.print(f"SuperLink and its Control API on {deployment.internal_address}, this machine only "
                          f"(`FLWR_HOME={deployment.flwr_home} flwr ls {CONNECTION}`)")
            run_id = deployment.submit()
            console.print(f"run {run_id}: {fed.rounds} rounds, {fed.clients_per_round} devices per round "
                          f"(waits until that many are connected)")
            console.print(f"records: [bold]{run.records_path}[/], checkpoint: [bold]{run.checkpoint}[/], "
                          f"logs: {run.logs}")
            shown = [0]

            def show_rounds() -> None:
                records = run.records()
                for entry in records[shown[0]:]:
                    console.print(f"round {entry.round}: accuracy {entry.accuracy:.4f}, {entry.clients} devices, "
                                  f"up {entry.uplink_bytes} B, down {entry.downlink_bytes} B "
                                  f"({time.monotonic() - started:.0f} s)")
                shown[0] = len(records)

            status = deployment.wait(args.timeout, on_poll=show_rounds)
        except FlowerError as error:
            console.print(f"[red]pollen server: {error}[/]")
            return 1
        except KeyboardInterrupt:
            console.print(f"stopped; go on with `pollen server --resume {deployment.folder} "
                          f"--certs {args.certs or '...'}`")
            return 130
    traffic = status.get("network-traffic", {})
    console.print(f"done in {time.monotonic() - started:.0f} s; Flower counted {traffic.get('total-bytes', '?')} "
                  f"bytes to and from the devices; export with `pollen export {deployment.folder}`")
    return 0


def client_command(args: argparse.Namespace) -> int:
    from pollen.client.device import DEFAULT_LOCAL_PORT, DeviceError, supernode_command
    from pollen.data_files import read_path
    from pollen.flower_processes import offline_env

    if args.insecure:
        print("WARNING: --insecure: this device's updates travel unencrypted", file=sys.stderr)
    elif not (args.ca and args.key):
        raise DeviceError("--ca and --key are required (from `pollen certs`), or pass --insecure")
    # Check the format now, not mid-round; the run's class count is checked when a round loads it.
    split = read_path(args.data)
    command = supernode_command(args.server, Path(args.data), None if args.insecure else Path(args.ca),
                                Path(args.key) if args.key else None, args.local_port or DEFAULT_LOCAL_PORT)
    print(f"device: {len(split)} examples in {args.data}; connecting to {args.server}", flush=True)
    # Become the SuperNode: same PID, so whoever started `pollen client` can stop it.
    os.execvpe(command[0], command, offline_env())
    return 0  # not reached


def export_command(args: argparse.Namespace) -> int:
    from pollen.server.export import export_run

    result = export_run(Path(args.run), args.format, Path(args.output) if args.output else None)
    print(f"wrote {result.path} ({result.bytes / 1e6:.2f} MB, {result.format}); outputs match the "
          f"PyTorch model within {result.max_difference:.2e} on {result.checked} test images")
    return 0
