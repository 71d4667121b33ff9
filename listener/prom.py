"""Prometheus metrics without a client library: counters, gauges and tallies in a registry, and the registry
written out in Prometheus' text exposition format 0.0.4 (what ``/metrics`` serves).

Only what the listener uses, with nothing but the standard library: importing ``prometheus_client`` costs
the listener's start-up ~120M instructions (its package imports an HTTP server, email, urllib, wsgiref...).
Metrics are updated and scraped on the event loop's one thread: nothing here takes a lock, so an ``inc`` is
a float addition. Counters keep no ``_created`` series.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Generic, TypeVar

#: the Content-Type of :func:`exposition`'s text
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_METRIC_CHARS = _LABEL_CHARS | {":"}


class MetricError(ValueError):
    """A metric defined or used against the rules (a bad or taken name, the wrong label values, a counter
    decreased): a mistake in the code, reported where it is made."""


class Sample:
    """One series' value: ``name`` as exposed (a counter's with ``_total``), its labels."""

    __slots__ = ("labels", "name", "value")

    def __init__(self, name: str, labels: dict[str, str], value: float) -> None:
        self.name, self.labels, self.value = name, labels, value

    def __repr__(self) -> str:
        return f"Sample({self.name!r}, {self.labels!r}, {self.value!r})"


class Family:
    """A metric family as collected: ``name`` without a counter's ``_total``; ``type`` counter or gauge."""

    __slots__ = ("documentation", "labelnames", "name", "samples", "type")

    def __init__(self, name: str, documentation: str, type: str, labelnames: tuple[str, ...],
                 samples: list[Sample]) -> None:
        self.name, self.documentation, self.type = name, documentation, type
        self.labelnames, self.samples = labelnames, samples

    def __repr__(self) -> str:
        return f"Family({self.name!r}, {self.type!r}, {self.labelnames!r}, {self.samples!r})"


if TYPE_CHECKING:  # (a Protocol class costs start-up instructions for nothing at run time)
    from typing import Protocol

    class Collector(Protocol):
        """What a :class:`Registry` holds: a named family that can be collected."""

        @property
        def name(self) -> str: ...

        def collect(self) -> Iterator[Family]: ...


class Registry:
    """The metric families ``/metrics`` exposes, in the order they were registered."""

    def __init__(self) -> None:
        self._collectors: dict[str, Collector] = {}

    def register(self, collector: Collector) -> None:
        if collector.name in self._collectors:
            raise MetricError(f"metric {collector.name!r} is registered twice: give the second one another name")
        self._collectors[collector.name] = collector

    def collect(self) -> Iterator[Family]:
        for collector in list(self._collectors.values()):
            yield from collector.collect()

    def get_sample_value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """The value of the sample ``name`` (a counter's with ``_total``) with exactly ``labels``; None if
        there is none."""
        labels = labels or {}
        for family in self.collect():
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return sample.value
        return None


def _check_names(name: str, labelnames: Iterable[str]) -> tuple[str, ...]:
    if not name or name[0].isdigit() or not _METRIC_CHARS.issuperset(name):
        raise MetricError(f"metric name {name!r}: letters, digits, '_' and ':' only, not starting with a digit")
    names = tuple(labelnames)
    for label in names:
        if not label or label[0].isdigit() or not _LABEL_CHARS.issuperset(label) or label.startswith("__"):
            raise MetricError(f"label name {label!r} of {name}: letters, digits and '_', not starting with '__'")
    if len(set(names)) != len(names):
        raise MetricError(f"metric {name}: a label name is listed twice in {names}")
    return names


class CounterChild:
    """One series of a :class:`Counter`: a value that only goes up."""

    __slots__ = ("_value",)

    def __init__(self) -> None:
        self._value = 0.0

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise MetricError(f"a counter only goes up: inc({amount}); use a gauge for a value that goes down")
        self._value += amount

    def get(self) -> float:
        return self._value


class GaugeChild:
    """One series of a :class:`Gauge`: a value set, or read from a function when scraped."""

    __slots__ = ("_function", "_value")

    def __init__(self) -> None:
        self._value = 0.0
        self._function: Callable[[], float] | None = None

    def set(self, value: float) -> None:
        """Set the value (replacing a function given to :meth:`set_function`)."""
        self._value = float(value)
        self._function = None

    def inc(self, amount: float = 1) -> None:
        self._value += amount

    def dec(self, amount: float = 1) -> None:
        self._value -= amount

    def set_function(self, function: Callable[[], float]) -> None:
        """Read the value from ``function`` whenever the gauge is collected."""
        self._function = function

    def get(self) -> float:
        function = self._function
        return self._value if function is None else float(function())


Child = TypeVar("Child", CounterChild, GaugeChild)


class _Metric(Generic[Child]):
    """A family of series told apart by label values; without label names, the one series itself."""

    _type = ""
    _suffix = ""

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str] = (), *,
                 registry: Registry | None = None) -> None:
        self.name, self.documentation = name, documentation
        self.labelnames = _check_names(name, labelnames)
        #: label values -> series
        self._children: dict[tuple[str, ...], Child] = {}
        #: the one series of a family without labels
        self._only: Child | None = None if self.labelnames else self._new_child()
        if registry is not None:
            registry.register(self)

    def _new_child(self) -> Child:
        raise NotImplementedError

    def labels(self, *values: object, **named: object) -> Child:
        """The series of these label values (by position or by label name), created at its first use."""
        if not named:
            child = self._children.get(values)  # type: ignore[arg-type]  # str values: the key as it is
            if child is not None:
                return child
        else:
            if values or set(named) != set(self.labelnames):
                raise MetricError(f"{self.name}.labels() takes the values of {self.labelnames}, by position or "
                                  f"by name, not {values} {sorted(named)}")
            values = tuple(named[label] for label in self.labelnames)
        if len(values) != len(self.labelnames) or not self.labelnames:
            raise MetricError(f"{self.name}.labels() takes {len(self.labelnames)} values {self.labelnames}, "
                              f"not {len(values)}")
        key = tuple(str(value) for value in values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._new_child()
        return child

    def _one(self) -> Child:
        only = self._only
        if only is None:
            raise MetricError(f"{self.name} has labels {self.labelnames}: use {self.name}.labels(...)")
        return only

    def collect(self) -> Iterator[Family]:
        name, labelnames = self.name + self._suffix, self.labelnames
        if self._only is not None:
            samples = [Sample(name, {}, self._only.get())]
        else:
            samples = [Sample(name, dict(zip(labelnames, key, strict=True)), child.get())
                       for key, child in list(self._children.items())]
        yield Family(self.name, self.documentation, self._type, labelnames, samples)


class Counter(_Metric[CounterChild]):
    """A count that only goes up, exposed as ``NAME_total``."""

    _type = "counter"
    _suffix = "_total"

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str] = (), *,
                 registry: Registry | None = None) -> None:
        if name.endswith("_total"):
            raise MetricError(f"counter {name!r}: name it without '_total', which the exposition adds")
        super().__init__(name, documentation, labelnames, registry=registry)

    def _new_child(self) -> CounterChild:
        return CounterChild()

    def inc(self, amount: float = 1) -> None:
        self._one().inc(amount)

    def get(self) -> float:
        return self._one().get()


class Gauge(_Metric[GaugeChild]):
    """A value that goes up and down."""

    _type = "gauge"

    def _new_child(self) -> GaugeChild:
        return GaugeChild()

    def set(self, value: float) -> None:
        self._one().set(value)

    def inc(self, amount: float = 1) -> None:
        self._one().inc(amount)

    def dec(self, amount: float = 1) -> None:
        self._one().dec(amount)

    def set_function(self, function: Callable[[], float]) -> None:
        self._one().set_function(function)

    def get(self) -> float:
        return self._one().get()


class Tally:
    """A counter the hot path adds to per event without a lookup: ``cell(labels)`` once (a one-item list, the
    count of those label values), then ``cell[0] += 1`` per event. Exposed as ``NAME_total``; label values
    whose cell was taken but never counted have no sample."""

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str], *,
                 registry: Registry | None = None) -> None:
        self.name, self.documentation = name, documentation
        self.labelnames = _check_names(name, labelnames)
        self.cells: dict[tuple[str, ...], list[int]] = {}
        if registry is not None:
            registry.register(self)

    def cell(self, labels: tuple[str, ...]) -> list[int]:
        """The count of ``labels`` (the same list every time), to add to in place."""
        found = self.cells.get(labels)
        if found is None:
            found = self.cells[labels] = [0]
        return found

    def collect(self) -> Iterator[Family]:
        name, labelnames = self.name + "_total", self.labelnames
        samples = [Sample(name, dict(zip(labelnames, key, strict=True)), float(cell[0]))
                   for key, cell in list(self.cells.items()) if cell[0]]
        yield Family(self.name, self.documentation, "counter", labelnames, samples)


# -- the text format ---------------------------------------------------------------------------------


def format_value(value: float) -> str:
    """A sample value as Prometheus' clients write it: ``3.0``, ``0.25``, ``+Inf``, ``-Inf``, ``NaN``, and
    (as Go does) 7 to 16 digit numbers in exponent form: ``1.23456789e+08``."""
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    text = repr(value)
    if 1e6 <= value < 1e16:  # Python's repr writes these without an exponent
        whole, _, fraction = text.partition(".")
        digits = (whole + fraction).rstrip("0")
        mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{mantissa}e+{len(whole) - 1:02d}"
    return text


def escape_label_value(value: str) -> str:
    """A label value inside its double quotes: backslash, double quote and newline escaped."""
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def escape_help(text: str) -> str:
    """A ``# HELP`` text: backslash and newline escaped."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def exposition(registry: Registry) -> bytes:
    """Every family of ``registry`` in the text format 0.0.4 (:data:`CONTENT_TYPE`), UTF-8: ``# HELP`` and
    ``# TYPE`` (a counter's name with ``_total``), then a line per sample, its labels in name order."""
    out: list[str] = []
    for family in registry.collect():
        name = family.name + "_total" if family.type == "counter" else family.name
        out.append(f"# HELP {name} {escape_help(family.documentation)}\n# TYPE {name} {family.type}\n")
        for sample in family.samples:
            if sample.labels:
                labels = ",".join(f'{label}="{escape_label_value(value)}"'
                                  for label, value in sorted(sample.labels.items()))
                out.append(f"{sample.name}{{{labels}}} {format_value(sample.value)}\n")
            else:
                out.append(f"{sample.name} {format_value(sample.value)}\n")
    return "".join(out).encode()
