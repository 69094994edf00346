"""Versioned snapshot cache: every resource serialized once per version, shared by all streams.

A DiscoveryResponse is assembled from pre-serialized bytes. Protobuf fields can be
concatenated on the wire, so the per-stream nonce is appended to a shared body
instead of re-encoding a multi-megabyte message for every gateway.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from envoy.config.route.v3 import scoped_route_pb2
from google.protobuf.message import Message

from modelxds.xds.resources import (
    CLUSTER,
    PUSH_ORDER,
    ROUTE,
    SCOPED_ROUTE,
    WILDCARD_TYPES,
    Resources,
)

WILDCARD_NAME = "*"
# Response bodies a version keeps, by the set of names asked for: the usual sets (all, a
# gateway's subscription) come from every gateway alike; unusual ones are built per
# request rather than held for the life of the version.
MAX_BODIES = 16

# DiscoveryResponse field numbers (envoy/service/discovery/v3/discovery.proto)
_VERSION_INFO, _RESOURCES, _TYPE_URL, _NONCE = 1, 2, 4, 5
# google.protobuf.Any
_ANY_TYPE_URL, _ANY_VALUE = 1, 2


def _varint(n: int) -> bytes:
    if n < 0x80:  # a name, a short message: millions of these in a cold push
        return bytes((n,))
    if n < 0x4000:
        return bytes((n & 0x7F | 0x80, n >> 7))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


@dataclass(frozen=True, slots=True)
class TypeSnapshot:
    type_url: str
    version: str  # content hash: the same config gets the same version on any replica or restart
    resources: dict[str, bytes]  # name -> serialized Any
    _bodies: dict[frozenset[str] | None, bytes] = field(default_factory=dict, compare=False)
    published_at: float = field(default_factory=time.time, compare=False)  # wall clock
    # time.monotonic() of the oldest etcd change this version is the first to contain
    changed_at: float | None = field(default=None, compare=False)
    size: int = field(init=False, compare=False)  # bytes of every resource

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", sum(map(len, self.resources.values())))

    def response(self, names: frozenset[str] | None, nonce: str) -> bytes:
        """A serialized DiscoveryResponse with the named resources (None: all)."""
        body = self._bodies.get(names)
        if body is None:
            chosen = (
                sorted(self.resources) if names is None else sorted(names & self.resources.keys())
            )
            body = b"".join(
                [encode_field(_VERSION_INFO, self.version.encode())]
                + [encode_field(_RESOURCES, self.resources[n]) for n in chosen]
                + [encode_field(_TYPE_URL, self.type_url.encode())]
            )
            if len(self._bodies) < MAX_BODIES:
                self._bodies[names] = body
        return body + encode_field(_NONCE, nonce.encode())


def _empty(type_url: str) -> TypeSnapshot:
    return TypeSnapshot(type_url, "", {})


# Make-before-break: how long a cluster or scope the config no longer has stays. The
# routes that named the cluster, and the listener whose Lua computed the scope's key, go
# out in the same version (CDS before LDS before RDS on every stream), so by the time
# it leaves, every gateway routes elsewhere; Envoy answers 503 "no cluster" (not
# retried) for a route whose cluster it has already dropped, and 404 for a request
# whose scope it has. A scope kept keeps its route table. Listeners are not kept: nothing
# names a listener, and Envoy drains a removed listener's connections itself.
RETIRE_AFTER_S = 10.0
# The state-of-the-world types whose resources others name: one left out of a response
# is removed at once.
RETIRED_TYPES = (CLUSTER, SCOPED_ROUTE)


class SnapshotCache:
    """Holds the current config. The translator writes it; ADS streams only read it."""

    def __init__(
        self,
        *,
        retire_after_s: float = RETIRE_AFTER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.retire_after_s = retire_after_s
        self._clock = clock
        # per RETIRED_TYPES, resources set() no longer had: name -> when last in a config
        self._retiring: dict[str, dict[str, float]] = {t: {} for t in RETIRED_TYPES}
        # replaced whole by set(): a reader holding it sees one version of every type
        self._types: Mapping[str, TypeSnapshot] = MappingProxyType(
            {t: _empty(t) for t in PUSH_ORDER}
        )
        # per type, name -> (message, serialized Any, digest) of the last set
        self._built: dict[str, dict[str, tuple[Message, bytes, bytes]]] = {
            t: {} for t in PUSH_ORDER
        }
        self._listeners: set[asyncio.Event] = set()
        self.ready = asyncio.Event()  # set once the first real config is in

    def get(self, type_url: str) -> TypeSnapshot:
        return self._types.get(type_url) or _empty(type_url)

    def snapshot(self) -> Mapping[str, TypeSnapshot]:
        """Every type as of the last set(), together: what one response cycle sends."""
        return self._types

    def set(self, resources: Resources) -> list[str]:
        """Replace the config and wake the streams; returns the type URLs whose content
        changed. On the event loop: ``store`` then ``announce``."""
        changed = self.store(resources)
        self.announce(changed)
        return changed

    def store(self, resources: Resources, changed_at: float | None = None) -> list[str]:
        """Serialize and swap in a new config; returns the type URLs whose content changed.
        ``changed_at``: when the etcd change it is built from was seen (Placement's).

        Any thread, one call at a time: streams read the config as one reference swapped
        whole, so they see the old or the new one, and are woken by ``announce``.

        A message is taken as final once stored: passed again (the same object, as the
        scale translator does for what did not change), its bytes are reused, neither
        serialized nor, on streams that already have them, sent again.
        """
        changed = []
        types = dict(self._types)
        now = self._clock()
        for type_url in PUSH_ORDER:
            before = self._built[type_url]
            built = {}
            wanted = resources.get(type_url, {})
            if type_url in RETIRED_TYPES:
                wanted = self._with_retiring(type_url, wanted, before, now)
            elif type_url == ROUTE:
                wanted = self._with_tables_of_retiring_scopes(wanted, before)
            for name, msg in wanted.items():
                seen = before.get(name)
                if seen is None or seen[0] is not msg:
                    blob = encode_field(_ANY_TYPE_URL, type_url.encode()) + encode_field(
                        _ANY_VALUE, msg.SerializeToString(deterministic=True)
                    )
                    seen = (msg, blob, hashlib.blake2b(blob, digest_size=16).digest())
                built[name] = seen
            self._built[type_url] = built
            version = _version((name, digest) for name, (_, _, digest) in built.items())
            if version != types[type_url].version:
                serialized = {name: blob for name, (_, blob, _) in built.items()}
                types[type_url] = TypeSnapshot(type_url, version, serialized, changed_at=changed_at)
                changed.append(type_url)
        self._types = MappingProxyType(types)
        return changed

    def announce(self, changed: list[str]) -> None:
        """On the event loop: the stored config is in; wake the streams if it changed."""
        self.ready.set()
        if changed:
            for ev in self._listeners:
                ev.set()

    def subscribe(self, event: asyncio.Event) -> None:
        self._listeners.add(event)

    def unsubscribe(self, event: asyncio.Event) -> None:
        self._listeners.discard(event)

    def _with_retiring(
        self,
        type_url: str,
        wanted: Mapping[str, Message],
        before: Mapping[str, tuple[Message, bytes, bytes]],
        now: float,
    ) -> dict[str, Message]:
        """``wanted`` plus the resources of the last config that left it less than
        ``retire_after_s`` ago."""
        kept = dict(wanted)
        retiring = {}
        for name, (msg, _, _) in before.items():
            if name in wanted:
                continue
            since = self._retiring[type_url].get(name, now)
            if now - since < self.retire_after_s:
                kept[name] = msg
                retiring[name] = since
        self._retiring[type_url] = retiring
        return kept

    def _with_tables_of_retiring_scopes(
        self, tables: Mapping[str, Message], before: Mapping[str, tuple[Message, bytes, bytes]]
    ) -> Mapping[str, Message]:
        if not self._retiring[SCOPED_ROUTE]:
            return tables
        kept = dict(tables)
        for name in self._retiring[SCOPED_ROUTE]:
            scope = self._built[SCOPED_ROUTE][name][0]
            assert isinstance(scope, scoped_route_pb2.ScopedRouteConfiguration)
            table = scope.route_configuration_name
            if table not in kept and table in before:
                kept[table] = before[table][0]
        return kept

    @property
    def next_retirement(self) -> float | None:
        """When (on ``clock``) the next retiring resource may go: a set() then removes it."""
        since = [t for retiring in self._retiring.values() for t in retiring.values()]
        return min(since) + self.retire_after_s if since else None

    def retirement_in(self) -> float | None:
        """Seconds until a set() would remove a retiring resource; None: none retiring."""
        due = self.next_retirement
        return None if due is None else max(0.0, due - self._clock())

    @staticmethod
    def is_wildcard(type_url: str, names: Iterable[str]) -> bool:
        """LDS, CDS and SRDS: no names or ``"*"`` among them (the protocol's explicit
        wildcard) ask for every resource, never for one named ``*``."""
        if type_url not in WILDCARD_TYPES:
            return False
        names = list(names)
        return not names or WILDCARD_NAME in names


def _version(digests: Iterable[tuple[str, bytes]]) -> str:
    h = hashlib.blake2b(digest_size=8)
    for name, digest in sorted(digests):
        h.update(name.encode())
        h.update(b"\0")
        h.update(digest)
    return h.hexdigest()
