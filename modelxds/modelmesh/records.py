"""ModelMesh etcd records: parse (typed as ModelMesh's Java classes) and encode.

ModelMesh writes these with Jackson, NON_NULL + NON_DEFAULT: nulls, zeros, false
and empty maps are left out, so every field is optional and absent means default.
Fields we do not know are ignored: ModelMesh adds fields over releases.

A known field of the wrong type is handled by what it is for. Routing fields
(``ROUTING_FIELDS``) decide where requests go: guessing one would route traffic on
garbage, so the whole record is an error (``RecordError``). Any other field only
describes the pod or model: it takes its default, the record is kept, and the
problem is returned to the caller (``Parsed.problems``) to report.

Every value comes from etcd, which anyone with write access can fill with anything,
so parsing ``bytes`` raises nothing but ``RecordError``: not for deep nesting, huge
numbers, huge values, bad UTF-8 or NaN either.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Generic, NamedTuple, TypeVar

from modelxds.modelmesh.keys import Table

DEFAULT_MODEL_TYPE = "NLCLASSIFIER"
# etcd refuses requests above --max-request-bytes, 1.5 MiB by default, so a default
# etcd never holds a bigger value. The cap leaves room for an operator who raised
# that limit and bounds what one hostile value can cost to parse (time and memory).
MAX_VALUE_BYTES = 4 * 1024 * 1024
LONG_MIN, LONG_MAX = -(2**63), 2**63 - 1  # Java long
INT_MIN, INT_MAX = -(2**31), 2**31 - 1  # Java int

_EMPTY: Mapping[str, int] = MappingProxyType({})
_T = TypeVar("_T")
_R_co = TypeVar("_R_co", covariant=True)


class RecordError(ValueError):
    """A value in etcd that is not a record we can read."""


@dataclass(frozen=True, slots=True)
class ModelRecord:
    type: str = DEFAULT_MODEL_TYPE
    model_path: str = ""
    encryption_key: str = ""
    # instance id -> epoch ms when the load *started* ("loaded or loading")
    instance_ids: Mapping[str, int] = field(default_factory=lambda: _EMPTY)
    failed_in: Mapping[str, int] = field(default_factory=lambda: _EMPTY)
    refs: int = 0
    auto_delete: bool = False
    last_used: int = 0
    last_unload: int = 0
    actionable: bool = False


@dataclass(frozen=True, slots=True)
class VModelRecord:
    owner: str = ""
    active_model: str = ""
    target_model: str = ""
    target_failed: bool = False
    actionable: bool = False


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    start_time: int = 0
    version: int = 0
    location: str = ""
    zone: str = ""
    labels: tuple[str, ...] = ()
    lru_time: int = 0
    count: int = 0
    capacity: int = 0
    used: int = 0
    load_threads: int = 0
    loads_in_progress: int = 0
    rpm: int = 0
    shutdown: bool = False
    actionable: bool = False


@dataclass(frozen=True, slots=True)
class LitelinksRecord:
    hostname: str
    instance_id: str
    port: int = 0
    version: str = ""
    registration_time: int = 0
    conn_config: Mapping[str, str] = field(default_factory=dict)


Record = ModelRecord | VModelRecord | InstanceRecord | LitelinksRecord


class Parsed(NamedTuple, Generic[_R_co]):
    """A record, and why fields of it were ignored (they hold their defaults)."""

    record: _R_co
    problems: tuple[str, ...] = ()


class _Bad(Exception):
    """One field's value is not of its type; the message says what it is instead."""


class _HugeNumber:
    """A JSON integer too long to be any Java number, kept only to be described."""

    __slots__ = ("digits",)

    def __init__(self, digits: int) -> None:
        self.digits = digits


def _kind(v: object) -> str:
    # Never the whole value: it may be megabytes, or an int too long for str().
    if isinstance(v, bool):
        return f"bool {'true' if v else 'false'}"
    if isinstance(v, str):
        return f"str {json.dumps(v[:40])}{'...' if len(v) > 40 else ''}"
    if isinstance(v, int):
        if v.bit_length() > 128:  # str() of a long int is slow, or over the digit limit
            return f"a {v.bit_length() * 3 // 10}+ digit number"
        return f"int {v}"
    if isinstance(v, float):
        return f"float {v!r}"
    if isinstance(v, _HugeNumber):
        return f"a {v.digits}-digit number"
    if isinstance(v, list):
        return f"a list of {len(v)} items"
    if isinstance(v, dict):
        return f"an object with {len(v)} fields"
    return "null" if v is None else type(v).__name__


def _string(v: Any) -> str:
    if type(v) is not str:
        raise _Bad(f"expected a string, got {_kind(v)}")
    return v


def _bounded(v: Any, low: int, high: int, java: str) -> int:
    if type(v) is not int:  # not bool, not float: 1.7e12 is not a long
        raise _Bad(f"expected an integer, got {_kind(v)}")
    if not low <= v <= high:
        raise _Bad(f"expected a Java {java}, got {_kind(v)}")
    return v


def _long(v: Any) -> int:
    return _bounded(v, LONG_MIN, LONG_MAX, "long")


def _int(v: Any) -> int:
    return _bounded(v, INT_MIN, INT_MAX, "int")


def _bool(v: Any) -> bool:
    if type(v) is not bool:
        raise _Bad(f"expected true/false, got {_kind(v)}")
    return v


def _long_map(v: Any) -> Mapping[str, int]:
    if type(v) is not dict:
        raise _Bad(f"expected an object, got {_kind(v)}")
    # The hot path of a 300,000-record registry: check in place, wrap without copying
    # (JSON object keys are always strings).
    for k, x in v.items():
        if type(x) is not int or not LONG_MIN <= x <= LONG_MAX:
            try:
                _long(x)
            except _Bad as e:
                raise _Bad(f"entry {json.dumps(k[:40])}: {e}") from None
    return MappingProxyType(v)


def _str_map(v: Any) -> Mapping[str, str]:
    if type(v) is not dict:
        raise _Bad(f"expected an object, got {_kind(v)}")
    for k, x in v.items():
        if type(x) is not str:
            raise _Bad(f"entry {json.dumps(k[:40])}: expected a string, got {_kind(x)}")
    return v


def _str_tuple(v: Any) -> tuple[str, ...]:
    if type(v) is not list:
        raise _Bad(f"expected a list, got {_kind(v)}")
    for x in v:
        if type(x) is not str:
            raise _Bad(f"expected a list of strings, got an item {_kind(x)}")
    return tuple(v)


# (json name, attribute, reader, routing) per record type: one table drives parse and
# encode. Routing fields are the ones placement is built from (DESIGN.md section 3).
_Spec = tuple[tuple[str, str, Callable[[Any], Any], bool], ...]

_SPECS: dict[type, _Spec] = {
    ModelRecord: (
        ("type", "type", _string, False),
        ("mPath", "model_path", _string, False),
        ("encKey", "encryption_key", _string, False),
        ("instanceIds", "instance_ids", _long_map, True),
        ("failedIn", "failed_in", _long_map, True),
        ("refs", "refs", _int, False),
        ("autoDel", "auto_delete", _bool, False),
        ("lu", "last_used", _long, False),
        ("lul", "last_unload", _long, False),
        ("actionable", "actionable", _bool, False),
    ),
    VModelRecord: (
        ("o", "owner", _string, False),
        ("amid", "active_model", _string, True),
        ("tmid", "target_model", _string, True),
        ("failed", "target_failed", _bool, True),
        ("actionable", "actionable", _bool, False),
    ),
    InstanceRecord: (
        ("startTime", "start_time", _long, True),
        ("vers", "version", _long, False),
        ("loc", "location", _string, False),
        ("zone", "zone", _string, False),
        ("labels", "labels", _str_tuple, False),
        ("lruTime", "lru_time", _long, False),
        ("count", "count", _int, False),
        ("cap", "capacity", _long, False),
        ("used", "used", _long, False),
        ("lThreads", "load_threads", _int, False),
        ("lInProg", "loads_in_progress", _int, False),
        ("rpm", "rpm", _int, False),
        ("shutdown", "shutdown", _bool, True),
        ("actionable", "actionable", _bool, False),
    ),
    LitelinksRecord: (
        ("hostname", "hostname", _string, True),
        ("instanceId", "instance_id", _string, True),
        ("port", "port", _int, False),
        ("version", "version", _string, False),
        ("registrationTime", "registration_time", _long, False),
        ("connConfig", "conn_config", _str_map, False),
    ),
}

ROUTING_FIELDS: Mapping[type, frozenset[str]] = MappingProxyType(
    {cls: frozenset(name for name, _, _, on in spec if on) for cls, spec in _SPECS.items()}
)
_REQUIRED = frozenset({"hostname", "instance_id"})  # the only fields without a default


def _reject_constant(name: str) -> Any:
    # Jackson never writes NaN or Infinity; Python's json would accept them as floats.
    raise RecordError(f"not JSON: {name} is not a JSON number")


def _int_or_huge(text: str) -> int | _HugeNumber:
    # More than a sign and 19 digits is outside every Java integer type anyway.
    return int(text) if len(text) <= 20 else _HugeNumber(len(text.lstrip("-")))


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
# Only for a retry: a Python-level hook per integer would slow every record down.
_HUGE_NUMBER_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_int=_int_or_huge)


def _decode(text: str) -> Any:
    try:
        return _DECODER.decode(text)
    except (RecordError, json.JSONDecodeError, RecursionError, MemoryError) as e:
        raise _unreadable(e) from None
    except ValueError:
        pass  # int() refused a number above sys.get_int_max_str_digits()
    # Read it again keeping such numbers as markers, so only their field is affected.
    try:
        return _HUGE_NUMBER_DECODER.decode(text)
    except (ValueError, RecursionError, MemoryError) as e:
        raise _unreadable(e) from None


def _unreadable(e: Exception) -> RecordError:
    if isinstance(e, RecordError):
        return e
    if isinstance(e, RecursionError):
        return RecordError("not JSON we can read: nested too deeply")
    if isinstance(e, MemoryError):
        return RecordError("not JSON we can read: too large for memory")
    return RecordError(f"not JSON: {e}")


def _load(raw: bytes | str) -> tuple[dict[str, Any], str]:
    # checked before any work; for a str (tests, tools) the limit counts characters
    if len(raw) > MAX_VALUE_BYTES:
        raise RecordError(f"value of {len(raw)} bytes is above the {MAX_VALUE_BYTES}-byte limit")
    if isinstance(raw, str):
        text = raw
    else:
        try:
            text = raw.decode()  # strict: ModelMesh writes UTF-8, nothing else
        except UnicodeDecodeError as e:
            raise RecordError(f"not JSON: not UTF-8 ({e.reason} at byte {e.start})") from None
    doc = _decode(text)
    if type(doc) is not dict:
        raise RecordError(f"expected a JSON object, got {_kind(doc)}")
    return doc, text


def _is_text(value: object) -> bool:
    """False if a string in ``value`` holds a lone surrogate: it can't be encoded again."""
    if isinstance(value, str):
        strings: Any = (value,)
    elif isinstance(value, tuple):
        strings = value
    elif isinstance(value, Mapping):
        strings = [*value, *(x for x in value.values() if isinstance(x, str))]
    else:
        return True
    try:
        for s in strings:
            if not s.isascii():
                s.encode()
    except UnicodeEncodeError:
        return False
    return True


def _parse(cls: type[_T], raw: bytes | str) -> Parsed[_T]:
    doc, text = _load(raw)
    kwargs: dict[str, Any] = {}
    problems: list[str] = []
    spec = _SPECS[cls]
    for name, attr, read, routing in spec:
        v = doc.get(name)
        if v is None:
            continue
        try:
            kwargs[attr] = read(v)
        except _Bad as e:
            if routing:
                raise RecordError(f"field {name!r}: {e}") from None
            problems.append(f"field {name!r}: {e}")
    # A lone surrogate can only come from a \u escape; protobuf (the xDS config) and
    # UTF-8 refuse to encode it later, far from here.
    if "\\u" in text:
        for name, attr, _, routing in spec:
            if attr in kwargs and not _is_text(kwargs[attr]):
                why = f"field {name!r}: a string with a lone UTF-16 surrogate is not text"
                if routing:
                    raise RecordError(why)
                del kwargs[attr]
                problems.append(why)
    missing = [name for name, attr, _, _ in spec if attr in _REQUIRED and attr not in kwargs]
    if missing:
        raise RecordError(f"missing required field {', '.join(map(repr, missing))}")
    return Parsed(cls(**kwargs), tuple(problems))


def read_model(raw: bytes | str) -> Parsed[ModelRecord]:
    return _parse(ModelRecord, raw)


def read_vmodel(raw: bytes | str) -> Parsed[VModelRecord]:
    return _parse(VModelRecord, raw)


def read_instance(raw: bytes | str) -> Parsed[InstanceRecord]:
    return _parse(InstanceRecord, raw)


def read_litelinks(raw: bytes | str) -> Parsed[LitelinksRecord]:
    """A registration; its ``hostname`` comes back as a normalized IP address."""
    parsed = _parse(LitelinksRecord, raw)
    if not parsed.record.hostname or not parsed.record.instance_id:
        raise RecordError("litelinks record needs 'hostname' and 'instanceId'")
    address = pod_ip(parsed.record.hostname)
    if address != parsed.record.hostname:
        parsed = parsed._replace(record=replace(parsed.record, hostname=address))
    return parsed


def pod_ip(hostname: str) -> str:
    """The pod IP a litelinks ``hostname`` holds, normalized (``[FD00::0001]`` -> ``fd00::1``).

    ModelMesh registers the pod IP. Everything downstream needs an IP: Envoy rejects a
    whole endpoint or cluster resource for one host name in it (every pod would lose its
    routing), and pickers and the labeler match pods by IP. A name is not resolved here;
    the record is skipped, which leaves that pod alone without direct traffic.
    """
    try:
        ip = ipaddress.ip_address(hostname.removeprefix("[").removesuffix("]"))
    except ValueError:
        raise RecordError(
            f"field 'hostname': {hostname[:100]!r} is not an IP address; modelxds routes to "
            "pod IPs, so this pod gets no direct traffic"
        ) from None
    # Envoy rejects a zone id ("fe80::1%eth0") like a name; an unspecified or multicast
    # address is no pod's: 0.0.0.0 would send the pod's traffic to the gateway's own host
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        raise RecordError(f"field 'hostname': {hostname[:100]!r} has a zone id; need a pod IP")
    if ip.is_unspecified or ip.is_multicast:
        raise RecordError(f"field 'hostname': {hostname[:100]!r} is not a pod's unicast IP")
    return str(ip)


READERS: dict[Table, Callable[[bytes | str], Parsed[Record]]] = {
    Table.REGISTRY: read_model,
    Table.VMODELS: read_vmodel,
    Table.INSTANCES: read_instance,
    Table.LITELINKS: read_litelinks,
}


def parse_model(raw: bytes | str) -> ModelRecord:
    return read_model(raw).record


def parse_vmodel(raw: bytes | str) -> VModelRecord:
    return read_vmodel(raw).record


def parse_instance(raw: bytes | str) -> InstanceRecord:
    return read_instance(raw).record


def parse_litelinks(raw: bytes | str) -> LitelinksRecord:
    return read_litelinks(raw).record


PARSERS: dict[Table, Callable[[bytes | str], Record]] = {
    Table.REGISTRY: parse_model,
    Table.VMODELS: parse_vmodel,
    Table.INSTANCES: parse_instance,
    Table.LITELINKS: parse_litelinks,
}


def encode(record: Record) -> bytes:
    """Serialize as ModelMesh does: numbers as numbers, defaults (None, "", 0, false,
    empty) omitted."""
    out: dict[str, Any] = {}
    for name, attr, _, _ in _SPECS[type(record)]:
        value = getattr(record, attr)
        if attr == "type":
            # absent means NLCLASSIFIER, so an empty type is written to stay empty
            if value == DEFAULT_MODEL_TYPE:
                continue
        elif value in (None, "", 0, False) or (hasattr(value, "__len__") and len(value) == 0):
            continue
        if isinstance(value, Mapping):
            value = dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[name] = value
    return json.dumps(out, separators=(",", ":")).encode()
