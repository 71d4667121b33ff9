"""Command line: ``wal-listener [--config FILE]``, ``demo``, ``check-config``, ``backfill``, ``schema``, ``ddl``,
``--version``.

Exit codes: 0 stopped cleanly (SIGTERM/SIGINT), 2 invalid configuration, 1 anything else fatal.
Every error is one line on stderr (a config with several problems: one line each); no tracebacks for
problems a user can fix.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from typing import TYPE_CHECKING

from listener import __version__
from listener.errors import BrokerConfigError, ConfigError, ListenerError

if TYPE_CHECKING:
    from listener.config import Config

# asyncio, the config (pydantic) and the stages are imported when a command needs them: the listener's start
# imports them with the cyclic garbage collector off (see main)

log = logging.getLogger("listener")


DEFAULT_CONFIG = "config.yml"
_CONFIG_HELP = (
    f"YAML config file (default: {DEFAULT_CONFIG} when it exists, else the WAL_* environment variables alone)"
)

_TABLE_HELP = "'table' (every schema) or 'schema.table'"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wal-listener",
        description="Publish PostgreSQL changes (logical replication) to NATS JetStream, Kafka, RabbitMQ "
        "or Google Pub/Sub, at least once.",
    )
    parser.add_argument("--config", "-c", default=None, help=_CONFIG_HELP)
    parser.add_argument("--version", action="version", version=f"wal-listener {__version__}")
    # the global options are accepted after the subcommand too (wal-listener check-config --config x.yml)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", default=argparse.SUPPRESS, help=_CONFIG_HELP)
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser(
        "demo", parents=[common], help="start a throwaway PostgreSQL and NATS, make changes, print the events"
    )
    demo.add_argument("--changes", type=int, default=5, help="rows to insert (then update and delete)")
    sub.add_parser("check-config", parents=[common], help="validate the config and print it (secrets left out)")
    backfill = sub.add_parser(
        "backfill",
        parents=[common],
        help="ask the running listener to publish the rows tables already have (READ events), and follow it",
        description="Queue a backfill in the database (the listener of listener.slotName runs it while it "
        "streams) and show its progress until it is done. Exit 0 when done, 1 when it failed.",
    )
    backfill.add_argument("tables", nargs="*", metavar="TABLE", help=_TABLE_HELP)
    backfill.add_argument("--where", default="", help="only rows matching this SQL expression")
    backfill.add_argument("--name", default="", help="the backfill's name (default: cli-<time>); asked once per slot")
    backfill.add_argument("--no-wait", action="store_true", help="queue it and return at once")
    backfill.add_argument("--status", action="store_true", help="list the backfills of this slot and exit")
    backfill.add_argument(
        "--print-ddl",
        metavar="ROLE",
        nargs="?",
        const="",
        default=None,
        help="print the SQL that creates the state table (and grants ROLE what the listener needs) and exit",
    )
    schema = sub.add_parser(
        "schema",
        parents=[common],
        help="print the JSON Schema (draft 2020-12) of tables' events",
        description="Print the JSON Schema of the events of the tables named (every table the publication "
        "publishes when none is named), read from the config's database.",
    )
    schema.add_argument("tables", nargs="*", metavar="TABLE", help=_TABLE_HELP)
    ddl = sub.add_parser(
        "ddl",
        parents=[common],
        help="DDL events: whether the event trigger is installed, or the SQL a DBA runs to install it",
        description="Without an option: say whether the DDL event trigger (listener.ddl.capture) is installed and "
        "enabled in the config's database; exit 0 when it is, 1 when not. The options print SQL and exit without "
        "a config or a database.",
    )
    printed = ddl.add_mutually_exclusive_group()
    printed.add_argument("--print-sql", metavar="ROLE", nargs="?", const="", default=None,
                         help="print the SQL that installs the trigger (run it once as a superuser; idempotent); "
                         "with ROLE, that role may also keep its backfill state in the wal_listener schema")
    printed.add_argument("--print-drop-sql", action="store_true", help="print the SQL that removes the trigger")
    return parser


async def _ddl_state(cfg: Config) -> int:
    from listener.ddl import capture_state
    from listener.replication import Database

    db = Database(cfg)
    await db.connect()
    try:
        state = await capture_state(db.conn)
    finally:
        await db.close()
    _, problem = state.problem(cfg.database.user, cfg.database.name)
    print(problem or f"the DDL event trigger is installed and enabled in database {cfg.database.name!r}")
    return 1 if problem else 0


def load(given: str | None, warnings: list[str]) -> Config:
    """The config from the file given, else config.yml when it exists, else the environment alone."""
    from listener.config import ENV_PREFIX, load_config

    if given is not None:
        return load_config(given, warnings=warnings)
    if os.path.exists(DEFAULT_CONFIG):
        return load_config(DEFAULT_CONFIG, warnings=warnings)
    if not any(name.startswith(ENV_PREFIX) for name in os.environ):
        raise ConfigError(
            f"config: no --config given, no {DEFAULT_CONFIG} here and no {ENV_PREFIX}* variables set; "
            "pass --config FILE (see config_example.yml)"
        )
    try:
        return load_config(None, warnings=warnings)
    except ConfigError as exc:
        hint = f"config: no --config given and no {DEFAULT_CONFIG} here: the {ENV_PREFIX}* variables alone"
        raise ConfigError(f"{hint}\n{exc}") from None


async def _serve(path: str | None) -> int:
    import asyncio
    import signal

    from listener.app import Listener
    from listener.malloc import fix_mmap_threshold
    from listener.observability import setup_logging, setup_sentry

    fix_mmap_threshold()  # large rows' memory goes back to the kernel when freed (listener/malloc.py)

    warnings: list[str] = []
    cfg = load(path, warnings)
    setup_logging(cfg.logger.level, cfg.logger.fmt)
    setup_sentry(cfg)
    for warning in warnings:
        log.warning(warning)
    listener = Listener(cfg)
    _collector_for_streaming()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, listener.stop)
    log.info("starting", extra={"fields": {"version": __version__, "slot": cfg.listener.slot_name,
                                            "publisher": cfg.publisher.type.value,
                                            "compiled_hot_path": listener.builder.hot is not None}})
    return await listener.run()


#: the cyclic collector's first threshold once streaming (Python's default: 700 container allocations)
GC_THRESHOLD = 10_000


def _collector_for_streaming() -> None:
    """Keep the cyclic garbage collector off the hot path. Every event is a container object that lives
    until the broker acknowledges it (up to ``maxInFlight`` of them): with Python's defaults a collection
    ran every 700 of them, each in-flight event was traversed again by the older generations' collections,
    and the full ones walked every object of the start-up (modules, config models, schemas) too -- about a
    fifth of the listener's CPU once streaming. The start-up objects are frozen (never traversed again) and
    the first generation collects after 10,000 allocations instead of 700; the events themselves hold no
    cycles, so what the collector finds is unchanged, only found less often. The collector was off until
    here (main): the start-up's imports and config collected about 130 times for little garbage. That garbage
    is frozen with the rest instead of collected (~900 objects, against ~81,000 the collection would have
    walked for them: 22 ms, a twelfth of the start-up)."""
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD, second, third)
    gc.enable()


def _import_lean() -> None:
    """Import psycopg and pydantic's plugin loader without ``importlib.metadata`` (see listener.lean)."""
    from listener.lean import metadata_versions_only

    with metadata_versions_only():  # imported for their side effect: in sys.modules for the stages and models
        import psycopg  # noqa: F401
        import pydantic.plugin._loader  # noqa: F401


def _event_loop_policy() -> None:
    import asyncio

    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    collecting = gc.isenabled()
    if args.command is None:
        # pydantic looks for plugins among the entry points of every installed distribution the first time a
        # model validates (~5 ms of the start); the listener uses none. Set the variable (even empty) to load them.
        os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    if args.command is None and collecting:
        # the listener's start allocates a million objects (imports, the config's models) and frees few: the
        # collector stays off until _collector_for_streaming collects once and freezes what is left
        gc.disable()
    try:
        return _command(args)
    finally:
        if collecting:
            gc.enable()


def _command(args: argparse.Namespace) -> int:
    import asyncio

    try:
        if args.command == "demo":
            from listener.demo import run_demo

            return run_demo(changes=args.changes)
        if args.command == "check-config":
            import yaml

            warnings: list[str] = []
            cfg = load(args.config, warnings)
            for warning in warnings:
                print(warning, file=sys.stderr)
            shown = cfg.to_yaml_dict()
            from listener.config import redact_url

            shown["publisher"]["address"] = redact_url(cfg.publisher.address)  # a password in the URL too
            print(yaml.safe_dump(shown, sort_keys=False), end="")
            return 0
        if args.command == "ddl":
            from listener import catalog
            from listener.ddl import script

            if args.print_sql is not None or args.print_drop_sql:
                print(script(catalog.ddl_capture_remove() if args.print_drop_sql else
                             catalog.ddl_capture_install(args.print_sql)))
                return 0
            return asyncio.run(_ddl_state(load(args.config, [])))
        if args.command == "backfill":
            from listener.backfill_cli import run_backfill_command

            return asyncio.run(run_backfill_command(load(args.config, []), args))
        if args.command == "schema":
            from listener.schema_cli import run_schema_command

            return asyncio.run(run_schema_command(load(args.config, []), args.tables, sys.stdout))
        _event_loop_policy()
        _import_lean()
        return asyncio.run(_serve(args.config))
    except (ConfigError, BrokerConfigError) as exc:
        for line in str(exc).splitlines():  # a config with several problems: one line each
            print(f"wal-listener: {line}", file=sys.stderr)
        return 2
    except ListenerError as exc:
        print(f"wal-listener: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
