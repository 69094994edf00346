"""A Kubernetes API server stand-in: the real wire protocol over one generic object store.

It serves HTTP/1.1 on 127.0.0.1 from an event loop in its own thread, so the synchronous
`kubernetes` client, asyncio code in another loop, threads and `kubectl` subprocesses all talk
to it as they would to a cluster. Every kind lives in the same store: objects are JSON dicts,
one resourceVersion counter orders every write, and a bounded event history feeds watches
(a watch from before the history answers 410 Gone, as the real server's watch cache does).
Writes take one lock, whichever thread they come from (HTTP handlers or a test calling
`create`/`delete` directly), and hand their event to the loop, which feeds the open watches.

As on a real server, a create through the API drops `status` for kinds with a status
subresource, the main endpoint ignores status changes and `/status` changes only status;
a test that plays kubelet or controller writes status with `create()` or `/status`.

Deliberate simplifications: strategic merge patch replaces lists instead of merging them by
their patch merge key (labels and annotations, the maps the labeler patches, behave exactly
as on a real server); `limit`/`continue` are ignored; custom resources are not checked
against their schema; namespaces need not exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import random
import re
import socket
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kubernetes
import yaml
from aiohttp import web

JSON = dict[str, Any]
Objects = list[JSON]  # `list` is also a method of ApiServer
Matcher = Callable[[JSON], bool]

# fmt: off
REASONS = {400: "BadRequest", 403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed",
           409: "Conflict", 410: "Expired", 415: "UnsupportedMediaType", 422: "Invalid",
           429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable", 504: "Timeout"}
# fmt: on
ANNOTATIONS_MAX_BYTES = 256 * 1024
_NAME_RE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_DNS_SUBDOMAIN_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_GENERATED = "bcdfghjklmnpqrstvwxz2456789"  # the alphabet the real server's generateName uses


@dataclass(frozen=True)
class Logged:
    """One request as the server saw it."""

    method: str
    path: str
    query: dict[str, str]
    content_type: str
    body: Any
    status: int


class ApiError(Exception):
    """A failed API call; it travels to the client as a metav1 Status."""

    def __init__(
        self, code: int, message: str, *, reason: str = "", retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or REASONS.get(code, "InternalError")
        self.retry_after = retry_after

    def status(self) -> JSON:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }


@dataclass(frozen=True)
class Resource:
    """One served resource type (group, version, plural) and how the server treats it."""

    group: str
    version: str
    plural: str
    singular: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    status_subresource: bool = False
    columns: tuple[JSON, ...] = ()  # a CRD version's additionalPrinterColumns
    custom: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def store_key(self) -> tuple[str, str]:
        # all versions of one resource share their objects
        return (self.group, self.plural)

    def named(self, name: str) -> str:
        return f'{self.plural}.{self.group} "{name}"' if self.group else f'{self.plural} "{name}"'


# fmt: off
CRDS = Resource("apiextensions.k8s.io", "v1", "customresourcedefinitions",
                "customresourcedefinition", "CustomResourceDefinition", False, ("crd",), True)
BUILTIN = (
    Resource("", "v1", "pods", "pod", "Pod", True, ("po",), True),
    Resource("", "v1", "namespaces", "namespace", "Namespace", False, ("ns",), True),
    Resource("coordination.k8s.io", "v1", "leases", "lease", "Lease", True),
    CRDS,
)
# fmt: on


@dataclass(frozen=True)
class _Event:
    rv: int
    key: tuple[str, str]
    type: str
    obj: JSON
    prev: JSON | None


@dataclass(eq=False)
class _Watch:
    key: tuple[str, str]
    matches: Matcher
    rv: int  # every event up to this version has been queued (what a bookmark may claim)
    queue: asyncio.Queue[tuple[str, JSON] | None] = field(default_factory=asyncio.Queue)

    def offer(self, ev: _Event) -> None:
        if ev.rv <= self.rv:
            return  # already in the backlog this watch started with
        self.rv = ev.rv
        if ev.key == self.key and (kind := _seen_as(ev, self.matches)):
            self.queue.put_nowait((kind, ev.obj))


def _seen_as(ev: _Event, matches: Matcher) -> str | None:
    """The event type a filtered watcher sees: leaving or entering the selection is a
    DELETED or ADDED, as on the real server."""
    now = matches(ev.obj)
    if ev.type != "MODIFIED" or ev.prev is None:
        return ev.type if now else None
    before = matches(ev.prev)
    if now:
        return "MODIFIED" if before else "ADDED"
    return "DELETED" if before else None


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _age(timestamp: Any) -> str:
    try:
        then = datetime.strptime(str(timestamp), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return "<unknown>"
    secs = max(0, int((datetime.now(UTC) - then).total_seconds()))
    for limit, unit, size in ((120, "s", 1), (3 * 3600, "m", 60), (48 * 3600, "h", 3600)):
        if secs < limit:
            return f"{secs // size}{unit}"
    return f"{secs // 86400}d"


# --- selectors -----------------------------------------------------------------------------

_REQUIREMENT = re.compile(
    r"\s*(?P<neg>!?)\s*(?P<key>[A-Za-z0-9./_-]+)\s*"
    r"(?:(?P<op>==|=|!=)\s*(?P<value>[A-Za-z0-9._-]*)|\s+(?P<set>in|notin)\s*\((?P<values>[^)]*)\))?"
    r"\s*"
)


def label_matcher(selector: str) -> Callable[[dict[str, str]], bool]:
    """A predicate over labels for a labelSelector (=, ==, !=, in, notin, key, !key)."""
    tests: list[tuple[str, str, set[str]]] = []  # (in | notin | exists | absent, key, values)
    for part in re.split(r",(?![^()]*\))", selector):
        if not part.strip():
            continue
        m = _REQUIREMENT.fullmatch(part)
        if not m or (m["neg"] and (m["op"] or m["set"])):
            raise ApiError(400, f"labelSelector: unable to parse requirement {part.strip()!r}")
        values = {v.strip() for v in (m["values"] or m["value"] or "").split(",")}
        op = {"=": "in", "==": "in", "!=": "notin"}.get(m["op"], m["set"])
        tests.append((op or ("absent" if m["neg"] else "exists"), m["key"], values))

    def holds(labels: dict[str, str], op: str, key: str, values: set[str]) -> bool:
        if op in ("exists", "absent"):
            return (key in labels) == (op == "exists")
        return (labels.get(key) in values) == (op == "in")

    return lambda labels: all(holds(labels, *t) for t in tests)


def field_matcher(selector: str) -> Matcher:
    """A predicate for a fieldSelector of dotted paths (metadata.name=x, status.podIP!=y)."""
    tests: list[tuple[list[str], str, bool]] = []
    for part in filter(None, (p.strip() for p in selector.split(","))):
        m = re.fullmatch(r"([A-Za-z0-9.]+)\s*(==|=|!=)\s*(.*)", part)
        if not m:
            raise ApiError(400, f"fieldSelector: unable to parse requirement {part!r}")
        tests.append((m[1].split("."), m[3], m[2] != "!="))

    def lookup(obj: Any, path: list[str]) -> str:
        for step in path:
            obj = obj.get(step) if isinstance(obj, dict) else None
        return "" if obj is None else str(obj)

    return lambda obj: all((lookup(obj, p) == v) == eq for p, v, eq in tests)


# --- patches -------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any, *, strategic: bool = False) -> Any:
    """RFC 7386 JSON merge patch: maps merge recursively, null removes a key, anything else
    replaces. As strategic merge patch it also drops `$`-directives (e.g. kubectl's
    `$setElementOrder`) and still replaces lists (see the module docstring)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if strategic and key.startswith("$"):
            continue
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value, strategic=strategic)
    return result


def json_patch(doc: JSON, ops: Any) -> JSON:
    """RFC 6902 JSON patch with the add, remove, replace and test operations."""
    if not isinstance(ops, list):
        raise ApiError(400, "json patch: the body must be a list of operations")
    doc = copy.deepcopy(doc)
    for op in ops:
        kind, path, value = op.get("op"), op.get("path", ""), copy.deepcopy(op.get("value"))
        parent, last = _locate(doc, path)
        if kind == "add" and isinstance(parent, list):
            index = len(parent) if last == "-" else int(last) if last.isdigit() else -1
            if not 0 <= index <= len(parent):
                raise ApiError(422, f"json patch: index in {path!r} is out of range")
            parent.insert(index, value)
        elif kind == "add" and isinstance(parent, dict):
            parent[last] = value
        elif kind == "test" and _child(parent, last, path) != value:
            raise ApiError(422, f"json patch: test failed at {path!r}")
        elif kind in ("remove", "replace"):
            _child(parent, last, path)
            key = int(last) if isinstance(parent, list) else last
            if kind == "remove":
                del parent[key]
            else:
                parent[key] = value
        elif kind not in ("add", "test"):
            raise ApiError(400, f"json patch: unsupported op {kind!r}")
    return doc


def _locate(doc: JSON, path: str) -> tuple[Any, str]:
    """The container a JSON pointer points into, and the last token of the pointer."""
    if not path.startswith("/"):
        raise ApiError(422, f"json patch: path {path!r} must start with /")
    tokens = [t.replace("~1", "/").replace("~0", "~") for t in path[1:].split("/")]
    parent: Any = doc
    for token in tokens[:-1]:
        parent = _child(parent, token, path)
    return parent, tokens[-1]


def _child(container: Any, token: str, path: str) -> Any:
    if isinstance(container, dict) and token in container:
        return container[token]
    if isinstance(container, list) and token.isdigit() and int(token) < len(container):
        return container[int(token)]
    raise ApiError(422, f"json patch: path {path!r} does not exist")


# --- validation and tables -----------------------------------------------------------------

_NAME_RULE = "at most 63 characters of [A-Za-z0-9._-], alphanumeric at both ends"


def _validate_metadata(obj: JSON) -> None:
    """The real server's checks of labels and annotations, which a labeler can trip over."""
    meta = obj["metadata"]
    annotations = meta.get("annotations") or {}
    for key, value in (meta.get("labels") or {}).items():
        _validate_key(key, "metadata.labels")
        if not isinstance(value, str) or (value and not _NAME_RE.fullmatch(value)):
            raise ApiError(422, f"metadata.labels: Invalid value: {value!r}: empty or {_NAME_RULE}")
    for key, value in annotations.items():
        _validate_key(key, "metadata.annotations")
        if not isinstance(value, str):
            raise ApiError(422, f"metadata.annotations: Invalid value for {key!r}: not a string")
    size = sum(len(k.encode()) + len(v.encode()) for k, v in annotations.items())
    if size > ANNOTATIONS_MAX_BYTES:
        limit = f"must have at most {ANNOTATIONS_MAX_BYTES} bytes"
        raise ApiError(422, f"metadata.annotations: Too long: {limit}, has {size}")


def _validate_key(key: str, where: str) -> None:
    prefix, _, name = key.rpartition("/")
    if (prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN_RE.fullmatch(prefix))) or (
        not _NAME_RE.fullmatch(name)
    ):
        rule = f"an optional DNS subdomain prefix and '/', then a name of {_NAME_RULE}"
        raise ApiError(422, f"{where}: Invalid value: {key!r}: a key is {rule}")


_PATH_STEP = re.compile(
    r"\.(?P<field>[A-Za-z0-9_-]+)|\[(?P<index>\d+)\]"
    r"|\[\?\(@\.(?P<key>[A-Za-z0-9_.-]+)\s*==\s*[\"'](?P<want>[^\"']*)[\"']\)\]"
)


def jsonpath(obj: Any, path: str) -> Any:
    """The first value a printer column's JSONPath (.a.b, [0], [?(@.k=="v")]) selects."""
    values, pos = [obj], 0
    while pos < len(path):
        m = _PATH_STEP.match(path, pos)
        if not m:
            return None
        pos, found = m.end(), []
        for v in values:
            if m["field"] and isinstance(v, dict) and m["field"] in v:
                found.append(v[m["field"]])
            elif m["index"] and isinstance(v, list) and int(m["index"]) < len(v):
                found.append(v[int(m["index"])])
            elif m["key"] and isinstance(v, list):
                found += [i for i in v if str(jsonpath(i, "." + m["key"])) == m["want"]]
        values = found
    return values[0] if values else None


def _pod_cells(pod: JSON) -> list[Any]:
    spec, status, meta = pod.get("spec") or {}, pod.get("status") or {}, pod["metadata"]
    statuses = status.get("containerStatuses") or []
    ready = sum(1 for s in statuses if s.get("ready"))
    restarts = sum(int(s.get("restartCount", 0)) for s in statuses)
    phase = "Terminating" if meta.get("deletionTimestamp") else None
    phase = phase or status.get("reason") or status.get("phase") or "Pending"
    ready_of = f"{ready}/{len(spec.get('containers') or statuses)}"
    where = [status.get("podIP") or "<none>", spec.get("nodeName") or "<none>"]
    return [ready_of, phase, str(restarts), _age(meta.get("creationTimestamp")), *where]


def _column(name: str, type_: str = "string", priority: int = 0, fmt: str = "") -> JSON:
    return {"name": name, "type": type_, "format": fmt, "description": name, "priority": priority}


def _table(res: Resource, objs: list[JSON], rv: str, include: str) -> JSON:
    """A meta.k8s.io/v1 Table, the form kubectl asks for to print `get` output."""
    pods = res.store_key == ("", "pods")
    if pods:  # IP and Node only show with -o wide
        names = ("Ready", "Status", "Restarts", "Age", "IP", "Node")
        columns = [_column(n, priority=int(n in ("IP", "Node"))) for n in names]
    elif res.columns:  # as on the real server, Age shows only if the CRD lists it
        columns = [
            _column(c["name"], c.get("type", "string"), c.get("priority", 0), c.get("format", ""))
            for c in res.columns
        ]
    else:
        columns = [_column("Age")]
    rows = []
    for obj in objs:
        if pods:
            cells = _pod_cells(obj)
        elif res.columns:
            found = [(c.get("type"), jsonpath(obj, c["jsonPath"])) for c in res.columns]
            cells = [_age(v) if type_ == "date" and v else v for type_, v in found]
        else:
            cells = [_age(obj["metadata"].get("creationTimestamp"))]
        row: JSON = {"cells": [obj["metadata"]["name"], *cells]}
        if include == "Object":
            row["object"] = obj
        elif include != "None":
            partial = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1"}
            row["object"] = {**partial, "metadata": obj["metadata"]}
        rows.append(row)
    table = {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": rv}}
    return {**table, "columnDefinitions": [_column("Name", fmt="name"), *columns], "rows": rows}


def pod(name: str, namespace: str, ip: str, labels: dict[str, str] | None = None) -> JSON:
    """A ModelMesh runtime pod as a cluster shows it (Running, with its IP); `labels` are
    added to (and may override) ModelMesh's own `modelmesh-service` and `name` labels."""
    deployment = name.rsplit("-", 2)[0]  # pod names end in -<replicaset hash>-<suffix>
    started = _now()
    containers: Objects = [
        {"name": "mm", "image": "kserve/modelmesh:v0.12.0"},
        {"name": "rest-proxy", "image": "kserve/rest-proxy:v0.12.0"},
        {"name": "mlserver", "image": "seldonio/mlserver:1.6.1"},
    ]
    containers[0]["ports"] = [{"name": "grpc", "containerPort": 8033}]
    containers[1]["ports"] = [{"name": "http", "containerPort": 8008}]
    running: JSON = {"ready": True, "started": True, "restartCount": 0}
    running["state"] = {"running": {"startedAt": started}}
    statuses = [
        {"name": c["name"], "image": c["image"], "imageID": f"docker.io/{c['image']}", **running}
        for c in containers
    ]
    own = {"modelmesh-service": "modelmesh-serving", "name": deployment}
    meta = {"name": name, "namespace": namespace, "labels": {**own, **(labels or {})}}
    status = {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "startTime": started}
    status |= {"conditions": [{"type": "Ready", "status": "True"}], "containerStatuses": statuses}
    spec = {"containers": containers, "nodeName": "node-1"}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec, "status": status}


# --- the server ----------------------------------------------------------------------------


@dataclass
class _Injection:
    method: str
    plural: str
    subresource: str | None
    status: int
    times: int
    retry_after: int | None


class ApiServer:
    """The stand-in; `start()` it, point a client at `url`, `stop()` it."""

    def __init__(self, *, history: int = 1000, bookmark_interval: float = 1.0) -> None:
        self.url = ""
        self.requests: list[Logged] = []
        self._bookmark_interval = bookmark_interval
        self._lock = threading.RLock()
        self._resources: dict[tuple[str, str, str], Resource] = {
            (r.group, r.version, r.plural): r for r in BUILTIN
        }
        self._objects: dict[tuple[str, str], dict[tuple[str, str], JSON]] = {}
        self._rv = 0
        self._history: deque[_Event] = deque(maxlen=history)
        self._compacted = 0  # watches from an older version than this get 410 Gone
        self._injections: list[_Injection] = []
        self._watches: set[_Watch] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}})

    # --- lifecycle ---

    def start(self) -> str:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        loop = asyncio.new_event_loop()
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        loop.run_until_complete(self._runner.setup())
        loop.run_until_complete(web.SockSite(self._runner, sock).start())
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="kube-apiserver", daemon=True)
        self._thread.start()
        return self.url

    def stop(self) -> None:
        loop, runner, self._loop = self._loop, self._runner, None
        if loop is None or runner is None or self._thread is None:
            return

        async def shutdown() -> None:
            for w in self._watches:
                w.queue.put_nowait(None)
            await runner.cleanup()

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout=10)
        loop.close()

    def kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        """A kubeconfig whose current context reaches this server, without credentials."""
        context = {"cluster": "standin", "user": "standin", "namespace": namespace}
        config: JSON = {"apiVersion": "v1", "kind": "Config", "current-context": "standin"}
        config["clusters"] = [{"name": "standin", "cluster": {"server": self.url}}]
        config["users"] = [{"name": "standin", "user": {}}]
        config["contexts"] = [{"name": "standin", "context": context}]
        path.write_text(yaml.safe_dump(config))
        return path

    def api_client(self) -> kubernetes.client.ApiClient:
        config = kubernetes.client.Configuration()
        config.host = self.url
        return kubernetes.client.ApiClient(config)

    # --- direct state access for tests ---

    def add_crd(self, crd: dict[str, Any]) -> None:
        self.create(crd)

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Store `obj` as given, status included (the test plays kubelet and controllers)."""
        res = self._kind(obj.get("apiVersion", ""), obj.get("kind", ""))
        ns = (obj.get("metadata") or {}).get("namespace") or "default"
        return self._create(res, ns if res.namespaced else "", obj, keep_status=True)

    def get(
        self, api_version: str, kind: str, namespace: str | None, name: str
    ) -> dict[str, Any] | None:
        res = self._kind(api_version, kind)
        with self._lock:
            obj = self._objects.get(res.store_key, {}).get((namespace or "", name))
            return copy.deepcopy(obj)

    def list(
        self, api_version: str, kind: str, namespace: str | None = None
    ) -> list[dict[str, Any]]:
        return self._select(self._kind(api_version, kind), namespace, lambda _: True)

    def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> None:
        self._delete(self._kind(api_version, kind), namespace or "", name, {})

    def compact(self) -> None:
        with self._lock:
            self._history.clear()
            self._compacted = self._rv

    def inject(
        self,
        method: str,
        plural: str,
        status: int,
        *,
        times: int = 1,
        retry_after: int | None = None,
        subresource: str | None = None,
    ) -> None:
        """Fail the next `times` `method` requests to `plural` (or its `subresource`)."""
        with self._lock:
            self._injections.append(
                _Injection(method.upper(), plural, subresource, status, times, retry_after)
            )

    # --- the store ---

    def _kind(self, api_version: str, kind: str) -> Resource:
        with self._lock:
            for res in self._resources.values():
                if res.api_version == api_version and res.kind == kind:
                    return res
        raise ApiError(404, f"no resource for apiVersion {api_version!r} kind {kind!r}")

    def _select(self, res: Resource, namespace: str | None, matches: Matcher) -> Objects:
        with self._lock:
            store = self._objects.get(res.store_key, {})
            objs = [store[key] for key in sorted(store)]  # etcd's order: namespace, then name
            return [
                copy.deepcopy(o)
                for o in objs
                if namespace in (None, o["metadata"].get("namespace", "")) and matches(o)
            ]

    def _commit(self, res: Resource, kind: str, obj: JSON, prev: JSON | None) -> JSON:
        """Store one write (caller holds the lock) and hand its event to the watches."""
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        meta, store = obj["metadata"], self._objects.setdefault(res.store_key, {})
        if kind == "DELETED":
            del store[(meta.get("namespace", ""), meta["name"])]
        else:
            store[(meta.get("namespace", ""), meta["name"])] = obj
        if len(self._history) == self._history.maxlen:
            self._compacted = self._history[0].rv
        ev = _Event(self._rv, res.store_key, kind, copy.deepcopy(obj), copy.deepcopy(prev))
        self._history.append(ev)
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                self._loop.call_soon_threadsafe(self._publish, ev)
        return copy.deepcopy(obj)

    def _publish(self, ev: _Event) -> None:
        for w in self._watches:
            w.offer(ev)

    def _create(self, res: Resource, ns: str, body: JSON, *, keep_status: bool) -> JSON:
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if res.namespaced and meta.get("namespace", ns) != ns:
            raise ApiError(
                400,
                "metadata.namespace: the namespace of the object does not "
                "match the namespace of the request",
            )
        obj["apiVersion"], obj["kind"] = res.api_version, res.kind
        if res.namespaced:
            meta["namespace"] = ns
        if res.status_subresource and not keep_status:
            obj.pop("status", None)
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise ApiError(422, "metadata.name: Required value: name or generateName")
            meta["name"] = meta["generateName"] + "".join(random.choices(_GENERATED, k=5))
        meta.pop("resourceVersion", None)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        _validate_metadata(obj)
        with self._lock:
            if (ns, meta["name"]) in self._objects.get(res.store_key, {}):
                raise ApiError(
                    409, f"{res.named(meta['name'])} already exists", reason="AlreadyExists"
                )
            if res is CRDS:
                obj["status"] = self._register(obj)
            return self._commit(res, "ADDED", obj, None)

    def _current(self, res: Resource, ns: str, name: str) -> JSON:
        obj = self._objects.get(res.store_key, {}).get((ns, name))
        if obj is None:
            raise ApiError(404, f"{res.named(name)} not found", reason="NotFound")
        return obj

    def _update(
        self, res: Resource, ns: str, name: str, sub: str | None, change: Callable[[JSON], JSON]
    ) -> JSON:
        """Replace an object by `change(current)`: PUT and every kind of PATCH end here."""
        with self._lock:
            cur = self._current(res, ns, name)
            body = change(copy.deepcopy(cur))
            if not isinstance(body, dict) or not isinstance(body.get("metadata", {}), dict):
                raise ApiError(400, f"the body for {res.named(name)} is not an object")
            meta = body.setdefault("metadata", {})
            if meta.get("name", name) != name:
                raise ApiError(400, f"metadata.name: {meta['name']!r} does not match {name!r}")
            rv = meta.get("resourceVersion")
            if rv is None and res.custom:
                raise ApiError(
                    422,
                    "metadata.resourceVersion: Invalid value: 0: must be specified for an update",
                )
            if rv is not None and rv != cur["metadata"]["resourceVersion"]:
                raise ApiError(
                    409,
                    f"Operation cannot be fulfilled on {res.named(name)}: the "
                    "object has been modified; please apply your changes to the "
                    "latest version and try again",
                )
            new = self._next(res, cur, body, sub)
            _validate_metadata(new)
            if new == cur:
                return copy.deepcopy(cur)  # a no-op write keeps its version and sends no event
            if res is CRDS:
                self._register(new)
            return self._commit(res, "MODIFIED", new, cur)

    @staticmethod
    def _next(res: Resource, cur: JSON, body: JSON, sub: str | None) -> JSON:
        """What a write of `body` makes of `cur`: /status changes only status, the main
        endpoint everything else; generation counts changes outside metadata and status."""
        if sub == "status":
            new = copy.deepcopy(cur)
            new.pop("status", None)
            if body.get("status") is not None:
                new["status"] = copy.deepcopy(body["status"])
            return new
        new = copy.deepcopy(body)
        new["apiVersion"], new["kind"] = cur["apiVersion"], cur["kind"]
        meta, old = new["metadata"], cur["metadata"]
        for key in ("name", "namespace", "uid", "creationTimestamp", "generation"):
            meta.pop(key, None)
            if key in old:
                meta[key] = old[key]
        meta["resourceVersion"] = old["resourceVersion"]
        if res.status_subresource:
            new.pop("status", None)
            if "status" in cur:
                new["status"] = copy.deepcopy(cur["status"])

        def content(o: JSON) -> JSON:
            return {k: v for k, v in o.items() if k not in ("metadata", "status")}

        if content(new) != content(cur):
            meta["generation"] = int(old.get("generation", 1)) + 1
        return new

    def _delete(self, res: Resource, ns: str, name: str, options: JSON) -> JSON:
        with self._lock:
            cur = self._current(res, ns, name)
            want = (options.get("preconditions") or {}).get("resourceVersion")
            if want is not None and want != cur["metadata"]["resourceVersion"]:
                raise ApiError(
                    409,
                    f"Precondition failed for {res.named(name)}: "
                    f"resourceVersion {want} is not current",
                )
            if res is CRDS:  # its custom resources go with it
                served = (cur["spec"]["group"], cur["spec"]["names"]["plural"])
                self._objects.pop(served, None)
                for key in [k for k, r in self._resources.items() if r.store_key == served]:
                    del self._resources[key]
            return self._commit(res, "DELETED", copy.deepcopy(cur), cur)

    def _register(self, crd: JSON) -> JSON:
        """Serve a CRD's versions; returns the status the real server gives it."""
        try:
            spec = crd["spec"]
            names, group = spec["names"], spec["group"]
            plural, kind = names["plural"], names["kind"]
            versions = [v for v in spec["versions"] if v.get("served", True)]
        except (KeyError, TypeError) as e:
            raise ApiError(422, f"CustomResourceDefinition: spec field {e} is required") from e
        for v in versions:
            self._resources[(group, v["name"], plural)] = Resource(
                group,
                v["name"],
                plural,
                names.get("singular") or kind.lower(),
                kind,
                spec.get("scope") == "Namespaced",
                tuple(names.get("shortNames") or ()),
                "status" in (v.get("subresources") or {}),
                tuple(v.get("additionalPrinterColumns") or ()),
                custom=True,
            )
        accepted = {"listKind": f"{kind}List", **names}
        conditions = [
            {"type": t, "status": "True", "reason": r, "message": "", "lastTransitionTime": _now()}
            for t, r in (("NamesAccepted", "NoConflicts"), ("Established", "InitialNamesAccepted"))
        ]
        stored = [v["name"] for v in versions if v.get("storage")]
        return {"acceptedNames": accepted, "conditions": conditions, "storedVersions": stored}

    # --- HTTP ---

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        body: Any = None
        try:
            text = await request.text()
            try:
                body = json.loads(text) if text else None
            except json.JSONDecodeError as e:
                raise ApiError(400, f"the request body is not JSON: {e}") from e
            response = await self._dispatch(request, query, body)
        except ApiError as error:
            headers = {"Retry-After": str(error.retry_after)} if error.retry_after else None
            response = web.json_response(error.status(), status=error.code, headers=headers)
        if not response.prepared:
            self._log(request, query, body, response.status)
        return response

    def _log(self, request: web.Request, query: dict[str, str], body: Any, status: int) -> None:
        content_type = request.content_type if request.body_exists else ""
        self.requests.append(
            Logged(request.method, request.path, query, content_type, body, status)
        )

    async def _dispatch(
        self, request: web.Request, query: dict[str, str], body: Any
    ) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        if request.path == "/version":
            return web.json_response(
                {"major": "1", "minor": "32", "gitVersion": "v1.32.0", "platform": "linux/amd64"}
            )
        if parts in (["healthz"], ["livez"], ["readyz"]):
            return web.Response(text="ok")
        if parts == ["api"]:
            return web.json_response(
                {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
            )
        if parts == ["apis"]:
            return web.json_response(
                {"kind": "APIGroupList", "apiVersion": "v1", "groups": self._groups()}
            )
        if parts[:2] == ["openapi", "v3"]:
            return web.json_response(self._openapi("/".join(parts[2:])))
        if parts[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        elif len(parts) == 2 and parts[0] == "apis":
            found = [g for g in self._groups() if g["name"] == parts[1]]
            if found:
                return web.json_response({"kind": "APIGroup", "apiVersion": "v1", **found[0]})
            raise ApiError(404, f"the server could not find the API group {parts[1]!r}")
        else:
            raise ApiError(404, f"the server could not find the requested resource {request.path}")
        if not rest:
            return web.json_response(self._resource_list(group, version))
        ns: str | None = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            ns, rest = rest[1], rest[2:]
        plural = rest[0]
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        with self._lock:
            res = self._resources.get((group, version, plural))
        if res is None or len(rest) > 3 or (ns is not None and not res.namespaced):
            raise ApiError(404, f"the server could not find the requested resource {request.path}")
        if sub not in (None, "status") or (sub and not res.status_subresource):
            raise ApiError(404, f"{plural} has no subresource {sub!r}")
        self._injected(request.method, plural, sub)
        return await self._serve(request, res, ns or "", name, sub, query, body)

    def _injected(self, method: str, plural: str, sub: str | None) -> None:
        with self._lock:
            for inj in self._injections:
                if (inj.method, inj.plural, inj.subresource) == (method, plural, sub):
                    inj.times -= 1
                    if inj.times <= 0:
                        self._injections.remove(inj)
                    message = f"injected failure for {method} {plural}"
                    raise ApiError(inj.status, message, retry_after=inj.retry_after)

    async def _serve(
        self,
        request: web.Request,
        res: Resource,
        ns: str,
        name: str | None,
        sub: str | None,
        query: dict[str, str],
        body: Any,
    ) -> web.StreamResponse:
        method, scope = request.method, ns if res.namespaced else ""
        table = "as=Table" in request.headers.get("Accept", "")
        include = query.get("includeObject", "Metadata")
        if name is None and method == "GET":
            labels = label_matcher(query.get("labelSelector", ""))
            fields = field_matcher(query.get("fieldSelector", ""))

            def matches(o: JSON) -> bool:
                return labels(o["metadata"].get("labels") or {}) and fields(o)

            where = ns if (ns or not res.namespaced) else None
            if query.get("watch") in ("true", "1"):
                return await self._watch(request, res, where, matches, query, body)
            with self._lock:
                rv, items = str(self._rv), self._select(res, where, matches)
                too_old = query.get("resourceVersion", "0") not in ("0", rv)
                if query.get("resourceVersionMatch") == "Exact" and too_old:
                    raise ApiError(
                        410, "the exact resourceVersion asked for is not kept", reason="Expired"
                    )
            if table:
                return web.json_response(_table(res, items, rv, include))
            return web.json_response(
                {
                    "kind": f"{res.kind}List",
                    "apiVersion": res.api_version,
                    "metadata": {"resourceVersion": rv},
                    "items": items,
                }
            )
        if name is None and method == "POST":
            if not isinstance(body, dict):
                raise ApiError(400, f"the body for a new {res.kind} is not an object")
            created = self._create(res, scope, body, keep_status=False)
            return web.json_response(created, status=201)
        if name is None:
            raise ApiError(405, f"{method} is not supported on the {res.plural} collection")
        if method == "GET":
            with self._lock:
                obj, rv = copy.deepcopy(self._current(res, scope, name)), str(self._rv)
            return web.json_response(_table(res, [obj], rv, include) if table else obj)
        if method == "PUT":
            return web.json_response(self._update(res, scope, name, sub, lambda _: body))
        if method == "PATCH":
            kind = request.content_type
            if kind == "application/json-patch+json":
                change: Callable[[JSON], JSON] = lambda cur: json_patch(cur, body)  # noqa: E731
            elif kind in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
                strategic = kind.startswith("application/strategic")
                change = lambda cur: merge_patch(cur, body, strategic=strategic)  # noqa: E731
            else:
                raise ApiError(415, f"PATCH content type {kind!r} is not supported")
            return web.json_response(self._update(res, scope, name, sub, change))
        if method == "DELETE" and sub is None:
            options = body if isinstance(body, dict) else {}
            return web.json_response(self._delete(res, scope, name, options))
        raise ApiError(405, f"{method} is not supported on {res.named(name)}")

    async def _watch(
        self,
        request: web.Request,
        res: Resource,
        ns: str | None,
        matches: Matcher,
        query: dict[str, str],
        body: Any,
    ) -> web.StreamResponse:
        def selected(o: JSON) -> bool:
            return ns in (None, o["metadata"].get("namespace", "")) and matches(o)

        since = query.get("resourceVersion", "")
        if since and not since.isdigit():
            raise ApiError(400, f"resourceVersion: Invalid value: {since!r}: not a version")
        with self._lock:
            w = _Watch(res.store_key, selected, self._rv)
            if since in ("", "0"):
                for obj in self._select(res, ns, matches):
                    w.queue.put_nowait(("ADDED", obj))
            elif int(since) < self._compacted:
                # as the real server: 200, then one ERROR event with a 410 Status
                gone = ApiError(
                    410, f"too old resource version: {since} ({self._compacted})", reason="Expired"
                )
                w.queue.put_nowait(("ERROR", gone.status()))
            else:
                for ev in self._history:
                    kind = _seen_as(ev, selected) if ev.key == res.store_key else None
                    if ev.rv > int(since) and kind:
                        w.queue.put_nowait((kind, copy.deepcopy(ev.obj)))
            self._watches.add(w)
        loop = asyncio.get_running_loop()
        timeout = float(query.get("timeoutSeconds") or 0)
        deadline = loop.time() + timeout if timeout > 0 else None
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        next_bookmark = loop.time() + self._bookmark_interval
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            self._log(request, query, body, 200)
            while deadline is None or loop.time() < deadline:
                item: tuple[str, JSON] | None
                now = loop.time()
                if bookmarks and now >= next_bookmark and w.queue.empty():
                    # only with nothing queued may a bookmark claim everything up to w.rv
                    next_bookmark = now + self._bookmark_interval
                    meta = {"resourceVersion": str(w.rv)}
                    item = (
                        "BOOKMARK",
                        {"kind": res.kind, "apiVersion": res.api_version, "metadata": meta},
                    )
                else:
                    wait = min(1.0, next_bookmark - now if bookmarks else 1.0)
                    wait = min(wait, deadline - now) if deadline is not None else wait
                    try:
                        item = await asyncio.wait_for(w.queue.get(), max(wait, 0.001))
                    except TimeoutError:
                        if request.transport is None or request.transport.is_closing():
                            break
                        continue
                if item is None:
                    break
                event = {"type": item[0], "object": item[1]}
                await response.write(json.dumps(event).encode() + b"\n")
                if item[0] == "ERROR":
                    break
            await response.write_eof()
        except ConnectionError:
            pass  # the client went away
        finally:
            self._watches.discard(w)
        return response

    def _openapi(self, group_version: str) -> JSON:
        """Just enough OpenAPI v3 for kubectl to see that PATCH takes `fieldValidation`, so that
        it leaves validation to the server (which, being a stand-in, does not check schemas)."""
        with self._lock:
            served = list(self._resources.values())
        if not group_version:
            urls = {("apis/" if r.group else "api/") + r.api_version for r in served}
            return {"paths": {u: {"serverRelativeURL": f"/openapi/v3/{u}"} for u in urls}}
        paths = {}
        for r in served:
            if ("apis/" if r.group else "api/") + r.api_version == group_version:
                gvk = {"group": r.group, "version": r.version, "kind": r.kind}
                param = {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}
                patch = {"x-kubernetes-group-version-kind": gvk, "parameters": [param]}
                paths[f"/{group_version}/{r.plural}/{{name}}"] = {"patch": patch}
        if not paths:
            raise ApiError(404, f"no OpenAPI document for {group_version}")
        info = {"title": "Kubernetes", "version": "v1.32.0"}
        return {"openapi": "3.0.0", "info": info, "paths": paths}

    def _groups(self) -> Objects:
        with self._lock:
            versions: dict[str, dict[str, None]] = {}  # an ordered set per group
            for group, version, _ in self._resources:
                if group:
                    versions.setdefault(group, {})[version] = None
        groups = []
        for g, vs in versions.items():
            listed = [{"groupVersion": f"{g}/{v}", "version": v} for v in vs]
            groups.append({"name": g, "versions": listed, "preferredVersion": listed[0]})
        return groups

    def _resource_list(self, group: str, version: str) -> JSON:
        with self._lock:
            served = [
                r for r in self._resources.values() if (r.group, r.version) == (group, version)
            ]
        if not served:
            raise ApiError(
                404, f"the server could not find the requested resource {group}/{version}"
            )
        verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
        resources: Objects = []
        for r in served:
            common = {"namespaced": r.namespaced, "kind": r.kind}
            names = {"name": r.plural, "singularName": r.singular, "shortNames": [*r.short_names]}
            resources.append({**names, **common, "verbs": verbs})
            if r.status_subresource:
                status = {"name": f"{r.plural}/status", "singularName": ""}
                resources.append({**status, **common, "verbs": ["get", "patch", "update"]})
        group_version = f"{group}/{version}" if group else version
        listed = {"groupVersion": group_version, "resources": resources}
        return {"kind": "APIResourceList", "apiVersion": "v1", **listed}
