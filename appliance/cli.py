"""`cello`: serve, doctor, --version, and the API client commands (appliance/cli_client.py).

Only the stdlib at import time: the client commands and --version start fast, and the appliance's
modules (config, asyncio, aiohttp, drivers) load only for the commands that run it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("cello")


def _parser() -> argparse.ArgumentParser:
    from appliance.version import VERSION

    p = argparse.ArgumentParser(prog="cello", description="Network-boot appliance: PXE to iSCSI root disks.")
    p.add_argument("--version", action="version", version=f"cello {VERSION}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the appliance (proxyDHCP, TFTP, API, exports)")
    serve.add_argument("--config", type=Path, help="TOML file (default: embedded defaults)")
    serve.add_argument("--log-format", choices=("text", "json"), default="text")
    serve.add_argument("--log-level", choices=("debug", "info", "warning"), default="info")
    doctor = sub.add_parser("doctor", help="what this host has and lacks for each service")
    doctor.add_argument("--config", type=Path)
    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("config", type=Path)
    teardown = sub.add_parser(
        "teardown", help="remove every iSCSI export of this appliance and stop its tgtd (nodes lose their disks)",
        description="cello serve leaves the exports running when it stops, so that nodes keep their root "
                    "disks. This removes them on purpose: run it with cello serve stopped.")
    teardown.add_argument("--config", type=Path)
    teardown.add_argument("--yes", action="store_true", help="really do it")
    try:
        from appliance.cli_client import add_client_commands
    except ImportError:  # pragma: no cover - the client commands ship with the web package
        pass
    else:
        add_client_commands(sub)
    return p


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from appliance.app import FatalError, StartError, serve
    from appliance.config import load_config
    from appliance.logs import setup_logging

    setup_logging(args.log_format, getattr(logging, args.log_level.upper()))
    config = load_config(args.config)
    try:
        asyncio.run(serve(config, args.config))
    except StartError as e:
        print(f"cello: {e}", file=sys.stderr)
        return 2
    except FatalError as e:
        print(f"cello: fatal: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    log.info("stopped")
    return 0


def _teardown(args: argparse.Namespace) -> int:
    import asyncio

    from appliance.app import make_driver
    from appliance.config import load_config
    from appliance.host import StateDirBusy, lock_state_dir
    from iscsi.model import StorageError

    config = load_config(args.config)
    if not args.yes:
        print("cello teardown removes every iSCSI export of this appliance: each running node loses its "
              "root disk. Run it again with --yes to do it.", file=sys.stderr)
        return 2
    try:
        lock = lock_state_dir(config.appliance.state_dir)
    except StateDirBusy as e:
        print(f"cello: {e}: stop cello serve first", file=sys.stderr)
        return 1
    try:
        driver = make_driver(config)
        removed = asyncio.run(driver.teardown(config.iscsi.iqn_prefix))
    except StorageError as e:
        print(f"cello: teardown: {e}", file=sys.stderr)
        return 1
    finally:
        os.close(lock)
    print(f"cello: teardown: {removed} target(s) removed ({driver.name})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command not in ("serve", "doctor", "teardown", "check-config"):
        if args.command is None:
            parser.print_help()
            return 2
        from appliance.cli_client import run

        return run(args)
    from appliance.config import ConfigError, load_config

    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "doctor":
            from appliance.doctor import checks, report

            text, status = report(checks(load_config(args.config)))
            print(text)
            return status
        if args.command == "teardown":
            return _teardown(args)
        if args.command == "check-config":
            load_config(args.config)
            print(f"{args.config}: ok")
            return 0
        raise AssertionError(args.command)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
