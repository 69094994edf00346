"""ModelMesh etcd records: parse (strictly typed, tolerant of the unknown) and encode.

ModelMesh writes these with Jackson, NON_NULL + NON_DEFAULT: nulls, zeros, false
and empty maps are left out, so every field is optional and absent means default.
Fields we do not know are ignored; a known field of the wrong type is an error
that names the field, because guessing would route traffic on garbage.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

from modelxds.modelmesh.keys import Table

DEFAULT_MODEL_TYPE = "NLCLASSIFIER"

_EMPTY: Mapping[str, int] = MappingProxyType({})
_T = TypeVar("_T")


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


@dataclass(frozen=True, slots=True)
class VModelRecord:
    owner: str = ""
    active_model: str = ""
    target_model: str = ""
    target_failed: bool = False


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    start_time: int = 0
    version: str = ""
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


@dataclass(frozen=True, slots=True)
class LitelinksRecord:
    hostname: str
    instance_id: str
    port: int = 0
    version: str = ""
    registration_time: int = 0
    conn_config: Mapping[str, str] = field(default_factory=dict)


Record = ModelRecord | VModelRecord | InstanceRecord | LitelinksRecord

# (json name, attribute, reader) per record type: one table drives parse and encode.
_Spec = tuple[tuple[str, str, Callable[[str, Any], Any]], ...]


def _str(name: str, v: Any) -> str:
    if not isinstance(v, str):
        raise RecordError(f"field {name!r}: expected a string, got {_kind(v)}")
    return v


def _int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise RecordError(f"field {name!r}: expected an integer, got {_kind(v)}")
    return v


def _bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise RecordError(f"field {name!r}: expected true/false, got {_kind(v)}")
    return v


def _int_map(name: str, v: Any) -> Mapping[str, int]:
    if not isinstance(v, dict):
        raise RecordError(f"field {name!r}: expected an object, got {_kind(v)}")
    return MappingProxyType({_str(f"{name} key", k): _int(f"{name}.{k}", x) for k, x in v.items()})


def _str_map(name: str, v: Any) -> Mapping[str, str]:
    if not isinstance(v, dict):
        raise RecordError(f"field {name!r}: expected an object, got {_kind(v)}")
    return {_str(f"{name} key", k): str(x) for k, x in v.items()}


def _str_list(name: str, v: Any) -> tuple[str, ...]:
    if not isinstance(v, list):
        raise RecordError(f"field {name!r}: expected a list, got {_kind(v)}")
    return tuple(_str(f"{name}[]", x) for x in v)


def _kind(v: Any) -> str:
    text = json.dumps(v)
    return f"{type(v).__name__} {text[:40]}"


_SPECS: dict[type, _Spec] = {
    ModelRecord: (
        ("type", "type", _str),
        ("mPath", "model_path", _str),
        ("encKey", "encryption_key", _str),
        ("instanceIds", "instance_ids", _int_map),
        ("failedIn", "failed_in", _int_map),
        ("refs", "refs", _int),
        ("autoDel", "auto_delete", _bool),
        ("lu", "last_used", _int),
    ),
    VModelRecord: (
        ("o", "owner", _str),
        ("amid", "active_model", _str),
        ("tmid", "target_model", _str),
        ("failed", "target_failed", _bool),
    ),
    InstanceRecord: (
        ("startTime", "start_time", _int),
        ("vers", "version", _str),
        ("loc", "location", _str),
        ("zone", "zone", _str),
        ("labels", "labels", _str_list),
        ("lruTime", "lru_time", _int),
        ("count", "count", _int),
        ("cap", "capacity", _int),
        ("used", "used", _int),
        ("lThreads", "load_threads", _int),
        ("lInProg", "loads_in_progress", _int),
        ("rpm", "rpm", _int),
        ("shutdown", "shutdown", _bool),
    ),
    LitelinksRecord: (
        ("hostname", "hostname", _str),
        ("instanceId", "instance_id", _str),
        ("port", "port", _int),
        ("version", "version", _str),
        ("registrationTime", "registration_time", _int),
        ("connConfig", "conn_config", _str_map),
    ),
}

_REQUIRED = frozenset({"hostname", "instance_id"})  # the only fields without a default


def _parse(cls: type[_T], raw: bytes | str) -> _T:
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise RecordError(f"not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise RecordError(f"expected a JSON object, got {_kind(doc)}")
    kwargs = {
        attr: read(name, doc[name]) for name, attr, read in _SPECS[cls] if doc.get(name) is not None
    }
    missing = [name for name, attr, _ in _SPECS[cls] if attr in _REQUIRED and attr not in kwargs]
    if missing:
        raise RecordError(f"missing required field {', '.join(map(repr, missing))}")
    return cls(**kwargs)


def parse_model(raw: bytes | str) -> ModelRecord:
    return _parse(ModelRecord, raw)


def parse_vmodel(raw: bytes | str) -> VModelRecord:
    return _parse(VModelRecord, raw)


def parse_instance(raw: bytes | str) -> InstanceRecord:
    return _parse(InstanceRecord, raw)


def parse_litelinks(raw: bytes | str) -> LitelinksRecord:
    rec = _parse(LitelinksRecord, raw)
    if not rec.hostname or not rec.instance_id:
        raise RecordError("litelinks record needs 'hostname' and 'instanceId'")
    return rec


PARSERS: dict[Table, Callable[[bytes | str], Record]] = {
    Table.REGISTRY: parse_model,
    Table.VMODELS: parse_vmodel,
    Table.INSTANCES: parse_instance,
    Table.LITELINKS: parse_litelinks,
}


def encode(record: Record) -> bytes:
    """Serialize as ModelMesh does: defaults (None, "", 0, false, empty) are omitted."""
    out: dict[str, Any] = {}
    for name, attr, _ in _SPECS[type(record)]:
        value = getattr(record, attr)
        if value in (None, "", 0, False) or (hasattr(value, "__len__") and len(value) == 0):
            continue
        if attr == "type" and value == DEFAULT_MODEL_TYPE:
            continue  # absent means this type
        if isinstance(value, Mapping):
            value = dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[name] = value
    return json.dumps(out, separators=(",", ":")).encode()
