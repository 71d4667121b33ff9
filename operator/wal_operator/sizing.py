"""The listener pod's size: its resources by default, and ``listener.maxInFlightBytes`` from its memory limit.

A listener's memory is a base plus what it holds in flight. Measured (docs/operator.md, "Sizing"): an idle
listener is ~55 MB resident (Python, the libraries, the compiled hot path); on top of it come the events
read and not yet acknowledged -- each held as its event body and, until the broker acknowledged it, as
the frame the publisher wrote (about twice its bytes), plus a backfill's chunks being read and built (a
chunk's budget is a quarter of the bound). A backfill of 576 KB rows with the default 64 MiB bound peaks at
153-215 MB: 1.5-2.4 times the bound above the base.

So the bound is derived as a quarter of what the limit leaves above a base of 96 MiB (the measured base
with room for the heap's growth, TLS and the broker client's buffers): the base plus 3 times the bound (the
worst multiple seen, and then some) is three quarters of the limit plus 24 MiB, 408 MiB of 512 MiB. With
the default limit of 512 MiB the bound is 104 MiB; with 256 MiB, 40 MiB; with 1 GiB, 232 MiB. A limit under
128 MiB is refused (the base alone nearly fills it). A user's ``listener.maxInFlightBytes`` is kept as
written.
"""

from __future__ import annotations

import copy
import re
from decimal import Decimal, InvalidOperation
from typing import Any

MiB = 1024 * 1024

#: the listener container's resources; each key a user sets in spec.pod.resources replaces its default
#: (no CPU limit: throttling a CDC reader only adds lag)
DEFAULT_RESOURCES: dict[str, dict[str, str | int]] = {
    "requests": {"cpu": "100m", "memory": "256Mi"},
    "limits": {"memory": "512Mi"},
}
#: memory a listener needs whatever it holds in flight (measured ~55 MB, with room)
BASE_MEMORY = 96 * MiB
#: the bound is this share of the memory above the base
IN_FLIGHT_SHARE = 4
#: the smallest bound derived (listener.maxInFlightBytes' own minimum)
MIN_IN_FLIGHT_BYTES = 1 * MiB
#: the smallest memory limit a listener container may have
MIN_MEMORY_LIMIT = 128 * MiB

_QUANTITY = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+))(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?\d+)?")
_BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}


class QuantityError(ValueError):
    """A resource value that is not a Kubernetes quantity."""


def quantity(value: str | int) -> Decimal:
    """A Kubernetes quantity (``512Mi``, ``1G``, ``1.5Gi``, ``129e6``, ``100m``, ``2``) as a number."""
    if isinstance(value, bool):
        raise QuantityError(f"{value!r} is not a quantity")
    if isinstance(value, int):
        return Decimal(value)
    match = _QUANTITY.fullmatch(value.strip())
    if match is None:
        raise QuantityError(f"{value!r} is not a quantity such as 512Mi, 1Gi or 1G")
    number, suffix = match.groups()
    try:
        amount = Decimal(number)
    except InvalidOperation:
        raise QuantityError(f"{value!r} is not a quantity such as 512Mi, 1Gi or 1G") from None
    if not suffix:
        return amount
    if suffix in _BINARY:
        return amount * Decimal(1024) ** _BINARY[suffix]
    if suffix in _DECIMAL:
        return amount * Decimal(10) ** _DECIMAL[suffix]
    return amount * Decimal(10) ** int(suffix[1:])


def pod_resources(given: dict[str, dict[str, str | int]]) -> dict[str, dict[str, str | int]]:
    """The container's resources: :data:`DEFAULT_RESOURCES` with every key ``given`` sets replaced. A memory
    request a user set above the default limit raises the limit to it, and a memory limit set below the
    default request lowers the request to it (Kubernetes refuses a request over its limit)."""
    out = copy.deepcopy(DEFAULT_RESOURCES)
    for section, values in given.items():
        out.setdefault(section, {}).update(values)
    requests, limits = out.setdefault("requests", {}), out.setdefault("limits", {})
    user_requests, user_limits = given.get("requests", {}), given.get("limits", {})
    if "memory" in requests and "memory" in limits:
        if "memory" in user_requests and "memory" not in user_limits:
            if quantity(requests["memory"]) > quantity(limits["memory"]):
                limits["memory"] = requests["memory"]
        elif "memory" in user_limits and "memory" not in user_requests:
            if quantity(requests["memory"]) > quantity(limits["memory"]):
                requests["memory"] = limits["memory"]
    return {section: values for section, values in out.items() if values}


def memory_limit(resources: dict[str, dict[str, str | int]]) -> int:
    """Bytes of the container's memory limit (:func:`pod_resources`' result; the default when it has none)."""
    value = resources.get("limits", {}).get("memory", DEFAULT_RESOURCES["limits"]["memory"])
    return int(quantity(value))


def max_in_flight_bytes(limit: int) -> int:
    """listener.maxInFlightBytes for a memory limit of ``limit`` bytes: a quarter of what is above the base,
    in whole MiB, at least 1 MiB."""
    derived = (limit - BASE_MEMORY) // IN_FLIGHT_SHARE // MiB * MiB
    return max(MIN_IN_FLIGHT_BYTES, derived)


def resources_problem(given: dict[str, dict[str, Any]]) -> str:
    """Why ``spec.pod.resources`` cannot be used ('' when it can): its memory values must be quantities, the
    memory limit at least :data:`MIN_MEMORY_LIMIT`."""
    for section in ("requests", "limits"):
        value = given.get(section, {}).get("memory")
        if value is None:
            continue
        try:
            amount = quantity(value)
        except QuantityError as exc:
            return f"{section}.memory: {exc}"
        if amount <= 0:
            return f"{section}.memory: {value!r} must be more than 0"
        if section == "limits" and amount < MIN_MEMORY_LIMIT:
            return (f"limits.memory: {value!r} is less than the 128Mi a listener needs "
                    "(about 55 MB before any event; see docs/operator.md, Sizing)")
    return ""
