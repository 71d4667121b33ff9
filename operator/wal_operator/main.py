"""``wal-operator``: run the operator, or print the CRD it serves.

wal-operator run [--namespace NS ...] [--standalone]    # the operator (default: all namespaces)
wal-operator crd [--json-schema]                        # the CustomResourceDefinition as YAML (or JSON Schema)
wal-operator validate FILE...                           # check WalListener manifests offline (exit 1: problems)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys


def _run(namespaces: list[str], standalone: bool, liveness: str | None, verbose: bool) -> int:
    import kopf

    from wal_operator import handlers  # noqa: F401 - registers the handlers with kopf

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    kopf.run(
        standalone=standalone,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=liveness,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wal-operator", description="Kubernetes operator for wal-listener.")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the operator (the default)")
    run.add_argument("--namespace", "-n", action="append", default=[], help="watch only these namespaces")
    run.add_argument("--standalone", action="store_true", help="no peering with other operator replicas")
    run.add_argument(
        "--liveness", default="http://0.0.0.0:8080/healthz", help="kopf's liveness endpoint ('' to turn off)"
    )
    run.add_argument("--verbose", "-v", action="store_true")
    crd = sub.add_parser("crd", help="print the WalListener CustomResourceDefinition")
    crd.add_argument(
        "--json-schema", action="store_true",
        help="print the resource's JSON Schema instead (kubeconform, the YAML language server)",
    )
    validate = sub.add_parser(
        "validate",
        help="check WalListener manifests offline: the CRD's schema and CEL rules, then the operator's checks",
        description="One line per problem and exit 1; exit 0 when every WalListener is valid. Other kinds "
        "are skipped.",
    )
    validate.add_argument("files", nargs="+", metavar="FILE")
    args = parser.parse_args(argv)

    if args.command == "crd":
        from wal_operator.crd import crd_yaml, json_schema_text

        sys.stdout.write(json_schema_text() if args.json_schema else crd_yaml())
        return 0
    if args.command == "validate":
        from wal_operator.validate import main as validate_main

        return validate_main(args.files)
    if args.command is None:
        args = parser.parse_args(["run", *(argv or sys.argv[1:])])
    try:
        return _run(args.namespace, args.standalone, args.liveness or None, args.verbose)
    except KeyboardInterrupt:
        return 0
    except asyncio.CancelledError:  # pragma: no cover
        return 0


if __name__ == "__main__":
    sys.exit(main())
