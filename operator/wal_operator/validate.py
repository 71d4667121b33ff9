"""``wal-operator validate FILE...``: check WalListener manifests offline, before they are merged.

Three checks, in the order the cluster would make them: the CRD's schema (what ``kubectl apply`` refuses),
its CEL rules (also the API server's; transition rules, which compare with the stored object, cannot run
offline and are skipped), and the operator's own checks of the spec (a field the first two already
reported is not reported again)
(:func:`wal_operator.spec.parse_spec`: a row filter that could leave its parentheses, a secret written
inline, anything the listener's config model refuses). One line per problem; documents of other kinds
are left to other tools (kubeconform, ``kubernetes-validate``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from wal_operator.crd import VALIDATIONS, json_schema
from wal_operator.spec import API_GROUP, API_VERSION, KIND, SpecError, parse_spec

_NEEDS = "wal-operator validate needs jsonschema and cel-python: pip install 'wal-listener[validate]'"


def _nodes(value: Any, parts: list[str], where: str) -> Iterator[tuple[str, Any]]:
    """The values at a dotted VALIDATIONS path (``tables[]`` steps into every item), with their paths."""
    if not parts:
        yield where, value
        return
    head, rest = parts[0], parts[1:]
    name, each = (head[:-2], True) if head.endswith("[]") else (head, False)
    if not isinstance(value, dict) or name not in value:
        return
    child, path = value[name], f"{where}.{name}" if where else name
    if not each:
        yield from _nodes(child, rest, path)
    elif isinstance(child, list):
        for i, item in enumerate(child):
            yield from _nodes(item, rest, f"{path}.{i}")


def cel_problems(resource: dict[str, Any]) -> list[str]:
    """``path: message`` for every CEL rule of the CRD the resource breaks (transition rules skipped)."""
    import celpy
    from celpy.adapter import json_to_cel

    env = celpy.Environment()
    found = []
    for rule_path, rules in VALIDATIONS.items():
        for rule in rules:
            if "oldSelf" in rule["rule"]:
                continue
            program = env.program(env.compile(rule["rule"]))
            for path, value in _nodes(resource, rule_path.split("."), ""):
                if not bool(program.evaluate({"self": json_to_cel(value)})):
                    found.append(f"{path}: {rule['message']}")
    return found


def problems(resource: dict[str, Any]) -> list[str]:
    """Every problem of one WalListener document, one line each (schema and CEL first, then the operator)."""
    import jsonschema

    validator = jsonschema.Draft7Validator(json_schema())
    found = [
        f"{'.'.join(str(p) for p in error.absolute_path) or '(resource)'}: {error.message}"
        for error in sorted(validator.iter_errors(resource), key=lambda e: [str(p) for p in e.absolute_path])
    ]
    found += cel_problems(resource)
    try:
        parse_spec(resource.get("spec") or {})
    except SpecError as exc:  # what the schema cannot say; a field already reported is not said twice
        said = {line.split(": ", 1)[0] for line in found}
        found.extend(line for line in exc.problems if line.split(": ", 1)[0] not in said)
    return found


def _documents(path: Path) -> list[Any]:
    return list(yaml.safe_load_all(path.read_text(encoding="utf-8")))


def validate_files(paths: list[str]) -> tuple[list[str], int]:
    """(one line per problem, how many WalListener documents were checked)."""
    lines: list[str] = []
    checked = 0
    for name in paths:
        try:
            docs = _documents(Path(name))
        except OSError as exc:
            lines.append(f"{name}: cannot read: {exc.strerror}")
            continue
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            lines.append(f"{name}: not valid YAML: {str(exc).splitlines()[0]}")
            continue
        for doc in docs:
            if not isinstance(doc, dict) or doc.get("kind") != KIND:
                continue
            if doc.get("apiVersion") != f"{API_GROUP}/{API_VERSION}":
                lines.append(f"{name}: {KIND} with apiVersion {doc.get('apiVersion')!r}; "
                             f"this operator serves {API_GROUP}/{API_VERSION}")
                continue
            checked += 1
            label = f"{name}: {KIND}/{(doc.get('metadata') or {}).get('name', '?')}"
            lines.extend(f"{label}: {problem}" for problem in problems(doc))
    return lines, checked


def main(paths: list[str]) -> int:
    """Print one line per problem and return 1, or one summary line and 0 (2: cannot check)."""
    try:
        import celpy  # noqa: F401
        import jsonschema  # noqa: F401
    except ImportError:
        print(_NEEDS, file=sys.stderr)
        return 2
    lines, checked = validate_files(paths)
    for line in lines:
        print(line)
    if lines:
        return 1
    print(f"{checked} {KIND} resource(s) in {len(paths)} file(s): valid", file=sys.stderr)
    return 0
