#!/usr/bin/env python3
"""The reference pages of the docs site, generated from the code at every build, never written by hand:

- ``reference/configuration.md``: every key of the listener's config model (``listener.config.Config``):
  path, type, allowed values, default, description and its ``WAL_`` environment variables;
- ``reference/wallistener.md``: every field of the ``WalListener`` CRD's schema (``wal_operator.crd``) with
  type, default, validation (the CEL rules by their messages) and description;
- ``reference/metrics.md``: every metric family in the listener's Prometheus registry, labels and help;
- ``reference/operator-status.md``: the operator's status conditions with their reasons, and the Event
  reasons it posts, read from its source (``wal_operator/handlers.py``, ``status.py``).

The site's build runs this through ``scripts/mkdocs_hooks.py``; plain Markdown comes out, so any builder can
use it: ``python scripts/docs_reference.py DIR`` writes the pages under DIR.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

Row = list[str]


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").replace("``", "`")


def _prose(text: Any) -> str:
    """A description as Markdown shows it as written: no emphasis from ``*``, no HTML from ``<name>``."""
    return str(text).replace("``", "`").replace("*", "\\*").replace("<", "&lt;")


def _code(text: Any) -> str:
    return f"`{text}`" if str(text) != "" else '`""`'


def _table(head: list[str], rows: list[Row]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _anchor(ident: str) -> str:
    return f'<a id="{ident}"></a>'


# --------------------------------------------------------------------------------------------------
# JSON Schema helpers (the config model's and the CRD's)


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """``node`` with its ``$ref`` followed and a nullable ``anyOf [X, null]`` reduced to X."""
    while "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[1]]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    options = [o for o in node.get("anyOf", []) if o.get("type") != "null"]
    if len(options) == 1:
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        return _resolve({**options[0], **rest}, defs)
    return node


def _allowed(node: dict[str, Any], defs: dict[str, Any]) -> list[Any]:
    node = _resolve(node, defs)
    if "const" in node:
        return [node["const"]]
    return list(node.get("enum", []))


def _type(node: dict[str, Any], defs: dict[str, Any]) -> str:
    """A field's type in words: ``integer, 0 to 65535``, ``one of `halt`, `skip```, ``map: table -> ...``."""
    node = _resolve(node, defs)
    allowed = _allowed(node, defs)
    if allowed:
        return "one of " + ", ".join(_code(v) for v in allowed)
    kind = node.get("type")
    if node.get("x-kubernetes-int-or-string"):
        kind = "integer or string"
    if isinstance(kind, list):
        kind = " or ".join(kind)
    fmt = node.get("format")
    if fmt == "duration":
        text = "duration (`500ms`, `10s`, `1m30s`)"
    elif fmt == "password":
        text = "string (secret)"
    elif kind == "array":
        text = f"list of {_type(node.get('items', {}), defs)}"
    elif kind == "object" and "properties" in node:
        text = "section"
    elif kind == "object" and isinstance(node.get("additionalProperties"), dict):
        text = f"map: name → {_type(node['additionalProperties'], defs)}"
    elif kind == "object":
        text = "object (passed through as written)"
    elif "anyOf" in node or "oneOf" in node:
        text = " or ".join(_type(o, defs) for o in node.get("anyOf", node.get("oneOf", [])))
    else:
        text = str(kind or "any")
    limits = []
    for key, word in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<")):
        if key in node:
            limits.append(f"{word} {node[key]}")
    if "maxLength" in node:
        limits.append(f"{node.get('minLength', 0)} to {node['maxLength']} characters")
    elif node.get("minLength") == 1:
        limits.append("not empty")
    elif "minLength" in node:
        limits.append(f"at least {node['minLength']} characters")
    if "minItems" in node:
        limits.append(f"at least {node['minItems']} items")
    if "pattern" in node and fmt != "duration":
        limits.append(f"matching `{node['pattern']}`")
    return text + (", " + ", ".join(limits) if limits else "")


def _default(node: dict[str, Any], required: bool) -> str:
    if required:
        return "**required**"
    if "default" not in node:
        return ""
    value = node["default"]
    if value is None:
        return "not set"
    if node.get("format") == "duration" and isinstance(value, str) and value.startswith("P"):
        from pydantic import TypeAdapter

        from listener.config import format_duration

        return _code(format_duration(TypeAdapter(timedelta).validate_python(value)))
    if isinstance(value, bool):
        return _code(str(value).lower())
    if isinstance(value, dict | list):
        import json

        return _code(json.dumps(value))
    return _code(value)


# --------------------------------------------------------------------------------------------------
# configuration


def _config_rows(
    node: dict[str, Any], defs: dict[str, Any], path: tuple[str, ...], env: Callable[[tuple[str, ...]], list[str]]
) -> Iterator[Row]:
    """One row per key under ``node`` (a section), sections before their keys, in the model's order."""
    node = _resolve(node, defs)
    members = [_resolve(m, defs) for m in node.get("oneOf", node.get("anyOf", []))]
    if members:  # a union of sections (publisher): every member's keys, each row saying whose it is
        yield from _union_rows(node, members, defs, path, env)
        return
    required = set(node.get("required", []))
    for name, sub in node.get("properties", {}).items():
        yield from _key(name, sub, name in required, defs, path, env, "")


def _key(
    name: str, sub: dict[str, Any], required: bool, defs: dict[str, Any], path: tuple[str, ...],
    env: Callable[[tuple[str, ...]], list[str]], whose: str,
) -> Iterator[Row]:
    key = (*path, name)
    resolved = _resolve(sub, defs)
    description = _prose(sub.get("description") or resolved.get("description", ""))
    if whose:
        description = f"*{whose}:* {description}"
    dotted = ".".join(key)
    yield [f"{_anchor(dotted)}`{dotted}`", _type(sub, defs), _default(resolved, required), description,
           " / ".join(f"`{e}`" for e in env(key))]
    if name in ("tables", "topicsMap"):  # their keys are table names, not config keys
        return
    if "properties" in resolved or "oneOf" in resolved:
        yield from _config_rows(resolved, defs, key, env)
    for inner in (resolved.get("items"), resolved.get("additionalProperties")):  # a list or map of sections
        if isinstance(inner, dict) and "properties" in _resolve(inner, defs):
            yield from _config_rows(inner, defs, key, env)


def _union_rows(
    node: dict[str, Any], members: list[dict[str, Any]], defs: dict[str, Any], path: tuple[str, ...],
    env: Callable[[tuple[str, ...]], list[str]],
) -> Iterator[Row]:
    tag = node.get("discriminator", {}).get("propertyName", "")
    labels = [", ".join(str(v) for v in _allowed(m.get("properties", {}).get(tag, {}), defs)) or m.get("title", "?")
              for m in members]
    names = list(dict.fromkeys(n for m in members for n in m.get("properties", {})))
    for name in names:
        if name == tag:
            key = (*path, name)
            dotted = ".".join(key)
            yield [f"{_anchor(dotted)}`{dotted}`", "one of " + ", ".join(_code(v) for v in labels), "**required**",
                   "The broker; the rows below say which keys each one has.", " / ".join(f"`{e}`" for e in env(key))]
            continue
        # the same key in several members: one row when it means the same everywhere, else one per meaning
        variants: dict[str, tuple[dict[str, Any], bool, list[str]]] = {}
        for label, member in zip(labels, members, strict=True):
            if name in member.get("properties", {}):
                sub = member["properties"][name]
                required = name in member.get("required", [])
                sig = repr((sub, required))
                variants.setdefault(sig, (sub, required, []))[2].append(label)
        for sub, required, whose in variants.values():
            who = "" if len(whose) == len(members) else ", ".join(whose)
            yield from _key(name, sub, required, defs, path, env, who)


def config_page() -> str:
    from listener.config import Config, env_names

    schema = Config.model_json_schema(by_alias=True, mode="validation")
    defs = schema.get("$defs", {})
    out = [
        "# Configuration reference\n",
        "Every key of the listener's configuration, generated from its model (`listener/config.py`) when this "
        "site is built. A key can also be set by its environment variable (last column), also when the file does "
        "not have it; a whole section by the section's variable, as YAML. How the file and the variables work "
        "together: [Configuration](../configuration.md).\n",
    ]
    required = set(schema.get("required", []))
    for name, sub in schema["properties"].items():
        resolved = _resolve(sub, defs)
        out.append(f"## `{name}`\n")
        if resolved.get("description") and "oneOf" not in resolved:
            out.append(_prose(resolved["description"]) + "\n")
        rows = list(_key(name, sub, name in required, defs, (), env_names, ""))[1:]
        out.append(_table(["key", "type", "default", "description", "environment"], rows))
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# the WalListener resource


def _crd_rows(node: dict[str, Any], path: str, required: bool) -> Iterator[Row]:
    checks = []
    if required:
        checks.append("required")
    for rule in node.get("x-kubernetes-validations", []):
        checks.append(f"{rule['message']} (CEL: `{rule['rule']}`)")
    if node.get("x-kubernetes-list-type") == "map":
        checks.append(f"one item per {', '.join(node.get('x-kubernetes-list-map-keys', []))}")
    default = _default(node, False)
    yield [f"{_anchor(path)}`{path}`", _type(node, {}), default, "; ".join(checks), _prose(node.get("description", ""))]
    children: list[tuple[str, dict[str, Any], bool]] = []
    wanted = set(node.get("required", []))
    for name, sub in node.get("properties", {}).items():
        children.append((f"{path}.{name}", sub, name in wanted))
    if isinstance(node.get("items"), dict) and node["items"].get("properties"):
        wanted = set(node["items"].get("required", []))
        children += [(f"{path}[].{n}", s, n in wanted) for n, s in node["items"]["properties"].items()]
    extra = node.get("additionalProperties")
    if isinstance(extra, dict) and extra.get("properties"):
        children += [(f"{path}{{}}.{n}", s, False) for n, s in extra["properties"].items()]
    for child_path, sub, needed in children:
        yield from _crd_rows(sub, child_path, needed)


def crd_page() -> str:
    from wal_operator.crd import build_crd
    from wal_operator.spec import API_GROUP, API_VERSION, KIND, PLURAL, SHORT_NAMES

    crd = build_crd()
    version = crd["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    out = [
        f"# The `{KIND}` resource\n",
        f"`apiVersion: {API_GROUP}/{API_VERSION}`, `kind: {KIND}` (plural `{PLURAL}`, short name "
        f"{', '.join(f'`{n}`' for n in SHORT_NAMES)}). Every field of the CustomResourceDefinition's schema, "
        "generated from it (`wal_operator/crd.py`, which builds it from the operator's spec model) when this site "
        "is built. `kubectl explain wallistener.spec.<field>` shows the same descriptions. A `[]` in a path "
        "steps into the items of a list. How to use it: [Kubernetes operator](../operator.md).\n",
    ]
    for top in ("spec", "status"):
        out.append(f"## `{top}`\n")
        out.append(_prose(schema["properties"][top].get("description", "")) + "\n")
        rows = list(_crd_rows(schema["properties"][top], top, top in schema.get("required", [])))
        out.append(_table(["field", "type", "default", "validation", "description"], rows))
    out.append("## Printer columns\n")
    out.append("What `kubectl get wallisteners` shows (`-o wide` adds the ones with priority 1).\n")
    columns = [[f"`{c['name']}`", f"`{c['jsonPath']}`", str(c.get("priority", 0))]
               for c in version["additionalPrinterColumns"]]
    out.append(_table(["column", "from", "priority"], columns))
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# metrics


def metrics_page() -> str:
    from listener import metrics

    rows = []
    for family in metrics.REGISTRY.collect():
        name = f"{family.name}_total" if family.type == "counter" else family.name
        rows.append([f"{_anchor(name)}`{name}`", family.type, ", ".join(f"`{n}`" for n in family.labelnames),
                     _prose(family.documentation)])
    return "\n".join([
        "# Metrics reference\n",
        "Every metric family the listener registers (`listener/metrics.py`), generated from its Prometheus "
        "registry when this site is built. They are served at `monitoring.promAddr` (`/metrics`, port 2112 by "
        "default), in Prometheus' text format 0.0.4. Counters are exposed with the `_total` suffix, as queried, "
        "and without `_created` series. What to watch and the alerts built on them: "
        "[Observability](../observability.md).\n",
        _table(["metric", "type", "labels", "help"], rows),
    ])


# --------------------------------------------------------------------------------------------------
# the operator's conditions and events, read from its source


class _Found:
    def __init__(self) -> None:
        self.conditions: dict[tuple[str, str, str], str] = {}  # (type, status, reason) -> message
        self.events: dict[tuple[str, str], str] = {}  # (reason, type) -> message


def _text(node: ast.expr | None) -> str:
    """A message as written: an f-string with its ``{expressions}``, or the literal; empty otherwise."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            if isinstance(value, ast.Constant):
                parts.append(str(value.value))
            elif isinstance(value, ast.FormattedValue):
                parts.append("{" + ast.unparse(value.value) + "}")
        return "".join(parts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return (_text(node.left) or "{…}") + (_text(node.right) or "{…}")
    return ""


def _strings(node: ast.expr) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        return _strings(node.body) + _strings(node.orelse)
    return []


class _Reader(ast.NodeVisitor):
    """Finds ``Condition(type, status, reason, message)`` and ``kopf.warn/event/info(..., reason=...)``."""

    def __init__(self, constants: dict[str, str], raised: dict[str, list[str]], found: _Found) -> None:
        self.constants = constants
        self.raised = raised  # exception class -> the reasons it is raised with
        self.found = found
        self.caught: dict[str, str] = {}  # name in an except clause -> its exception class
        self.assigned: dict[str, ast.expr] = {}  # local names of the function being read

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        outer = self.assigned
        self.assigned = {t.id: n.value for n in ast.walk(node) if isinstance(n, ast.Assign)
                         for t in n.targets if isinstance(t, ast.Name)}
        self.generic_visit(node)
        self.assigned = outer

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.name and isinstance(node.type, ast.Name):
            self.caught[node.name] = node.type.id
        self.generic_visit(node)

    def _values(self, node: ast.expr) -> list[str]:
        """What an argument can be: literals, a constant's value, a caught exception's reasons."""
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.attr in self.constants:
                return [self.constants[node.attr]]
            if node.value.id in self.caught:
                return self.raised.get(self.caught[node.value.id], [])
        if isinstance(node, ast.Name):
            if node.id in self.constants:
                return [self.constants[node.id]]
            if node.id in self.assigned:  # a local: the literals it is assigned (dictionary keys are not)
                return [s for n in ast.walk(self.assigned[node.id]) if isinstance(n, ast.Constant | ast.Attribute)
                        for s in self._values(n) if s[:1].isupper()] or [node.id]
        if isinstance(node, ast.IfExp):
            return self._values(node.body) + self._values(node.orelse)
        return _strings(node)

    def visit_Call(self, node: ast.Call) -> None:
        name = ast.unparse(node.func)
        if name.split(".")[-1] == "Condition" and len(node.args) >= 3:
            message = self._message(node.args[3]) if len(node.args) > 3 else ""
            for kind in self._values(node.args[0]):
                for status in self._values(node.args[1]):
                    for reason in self._values(node.args[2]):
                        if not reason[:1].isupper():
                            raise ValueError(f"cannot tell the reason of {ast.unparse(node)} (line {node.lineno})")
                        self.found.conditions.setdefault((kind, status, reason), message)
        elif name in ("kopf.warn", "kopf.event", "kopf.info", "kopf.exception"):
            words = {k.arg: k.value for k in node.keywords if k.arg}
            kind = {"kopf.warn": "Warning", "kopf.exception": "Error"}.get(name, "Normal")
            if "type" in words:
                kind = " / ".join(_strings(words["type"])) or kind
            for reason in self._values(words["reason"]):
                self.found.events.setdefault((reason, kind), self._message(words.get("message")))
        self.generic_visit(node)

    def _message(self, node: ast.expr | None) -> str:
        if isinstance(node, ast.Name) and node.id in self.assigned:
            node = self.assigned[node.id]
        text = _text(node)
        if not text and node is not None and ("exc" in ast.unparse(node) or "message" in ast.unparse(node)):
            return "(the error's own message)"
        return text


def read_operator(files: list[Path]) -> _Found:
    trees = [ast.parse(f.read_text(), str(f)) for f in files]
    constants = {t.id: n.value.value for tree in trees for n in tree.body if isinstance(n, ast.Assign)
                 for t in n.targets if isinstance(t, ast.Name) and isinstance(n.value, ast.Constant)
                 and isinstance(n.value.value, str)}
    classes = {n.name for tree in trees for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    raised: dict[str, list[str]] = {}
    for tree in trees:
        for n in ast.walk(tree):
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in classes and n.args:
                raised.setdefault(n.func.id, []).extend(_strings(n.args[0]))
    found = _Found()
    for tree in trees:
        _Reader(constants, raised, found).visit(tree)
    return found


def operator_page() -> str:
    from wal_operator import status

    source = REPO / "operator" / "wal_operator"
    found = read_operator([source / "handlers.py", source / "status.py"])
    order = {t: i for i, t in enumerate((status.READY, status.CONFLICT, *status.STEPS))}
    rows = [[f"{_anchor('condition-' + kind)}`{kind}`", f"`{state}`",
             f"{_anchor('reason-' + kind + '-' + reason)}`{reason}`",
             f"`{message}`" if message and not message.startswith("(") else message]
            for (kind, state, reason), message in sorted(found.conditions.items(),
                                                         key=lambda i: (order.get(i[0][0], 99), i[0]))]
    events = [[f"{_anchor('event-' + reason)}`{reason}`", kind,
               f"`{message}`" if message and not message.startswith("(") else message]
              for (reason, kind), message in sorted(found.events.items())]
    return "\n".join([
        "# Operator status and events\n",
        "Every status condition the operator writes into a `WalListener` (`status.conditions`) with each "
        "status and reason it can have, and every Event reason it posts (`kubectl describe wl NAME`), read from "
        "its source (`operator/wal_operator/handlers.py`, `status.py`) when this site is built. The messages are "
        "shown as written there, `{…}` standing for the values filled in. What each one asks of you: "
        "[What status tells you](../operator.md#what-status-tells-you).\n",
        "## Conditions\n",
        f"`{status.READY}` repeats the first of {', '.join(f'`{s}`' for s in status.STEPS)} that is not `True` "
        f"(or `{status.CONFLICT}` when that is `True`).\n",
        _table(["condition", "status", "reason", "message"], rows),
        "## Events\n",
        _table(["reason", "type", "message"], events),
    ])


def _once(page: str) -> str:
    """The page with each anchor kept where it first appears (a key with one row per broker has several)."""
    seen: set[str] = set()

    def first(match: re.Match[str]) -> str:
        if match.group(1) in seen:
            return ""
        seen.add(match.group(1))
        return match.group(0)

    return re.sub(r'<a id="([^"]+)"></a>', first, page)


def generate(page: str) -> str:
    """The Markdown of one generated page (a key of :data:`PAGES`)."""
    return _once(PAGES[page]())


#: page -> its generator (paths under the docs folder)
PAGES: dict[str, Callable[[], str]] = {
    "reference/configuration.md": config_page,
    "reference/wallistener.md": crd_page,
    "reference/metrics.md": metrics_page,
    "reference/operator-status.md": operator_page,
}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: docs_reference.py DIR   (writes the generated reference pages under DIR)", file=sys.stderr)
        return 2
    for page in PAGES:
        target = Path(argv[0]) / page
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(generate(page))
        print(target, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
