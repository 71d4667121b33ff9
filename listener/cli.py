"""Command line: ``wal-listener [--config FILE]``, ``wal-listener demo``, ``wal-listener --version``.

Exit codes: 0 stopped cleanly (SIGTERM/SIGINT), 2 invalid configuration, 1 anything else fatal.
Every error is one line on stderr; no tracebacks for problems a user can fix.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from listener import __version__
from listener.config import load_config, redact_url
from listener.errors import BrokerConfigError, ConfigError, ListenerError

log = logging.getLogger("listener")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wal-listener",
        description="Publish PostgreSQL changes (logical replication) to NATS JetStream, Kafka, RabbitMQ "
        "or Google Pub/Sub, at least once.",
    )
    parser.add_argument("--config", "-c", default="config.yml", help="YAML config file (default: config.yml)")
    parser.add_argument("--version", action="version", version=f"wal-listener {__version__}")
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="start a throwaway PostgreSQL and NATS, make changes, print the events")
    demo.add_argument("--changes", type=int, default=5, help="rows to insert (then update and delete)")
    sub.add_parser("check-config", help="validate the config file and print it (secrets left out)")
    return parser


async def _serve(config_path: str) -> int:
    from listener.app import Listener
    from listener.observability import setup_logging, setup_sentry

    warnings: list[str] = []
    cfg = load_config(config_path, warnings=warnings)
    setup_logging(cfg.logger.level, cfg.logger.fmt)
    setup_sentry(cfg)
    for warning in warnings:
        log.warning(warning)
    listener = Listener(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, listener.stop)
    log.info("starting", extra={"fields": {"version": __version__, "slot": cfg.listener.slot_name,
                                            "publisher": cfg.publisher.type.value,
                                            "compiled_hot_path": listener.builder.hot is not None}})
    return await listener.run()


def _event_loop_policy() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            from listener.demo import run_demo

            return run_demo(changes=args.changes)
        if args.command == "check-config":
            import yaml

            warnings: list[str] = []
            cfg = load_config(args.config, warnings=warnings)
            for warning in warnings:
                print(warning, file=sys.stderr)
            shown = cfg.to_yaml_dict()
            shown["publisher"]["address"] = redact_url(cfg.publisher.address)  # a password in the URL too
            print(yaml.safe_dump(shown, sort_keys=False), end="")
            return 0
        _event_loop_policy()
        return asyncio.run(_serve(args.config))
    except (ConfigError, BrokerConfigError) as exc:
        print(f"wal-listener: {exc}", file=sys.stderr)
        return 2
    except ListenerError as exc:
        print(f"wal-listener: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
