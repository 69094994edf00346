"""One ModelMesh-compatible pod: KServe V2 gRPC on its own address, an MLServer runtime,
an LRU cache of loaded models, and its placement in etcd exactly as ModelMesh keeps it.

Routing follows ModelMesh:

* a model loaded here is served here when the request says ``mm-balanced: true`` or this
  is the only copy; otherwise the copy with the fewest requests in flight serves it;
* a model loaded on another pod is forwarded there: one internal hop, counted;
* a miss places the model (most free capacity, then least recently used pod) with a
  compare-and-swap on its registry record, so concurrent misses load it exactly once,
  and the request waits for the load.

Like a ModelMesh Serving pod it also serves KServe V2 REST on ``--rest-port`` (8008),
through a REST proxy that calls this pod's own gRPC port (see restproxy.py).

    python -m modelxds.localmesh.node --host 127.0.0.11 --instance-id 7dd689-pod00 ...
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import gc
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import TypeVar

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from modelxds.kserve import grpc_predict_v2_pb2 as pb
from modelxds.kserve import grpc_predict_v2_pb2_grpc as pb_grpc
from modelxds.kserve.health import AlwaysServing
from modelxds.localmesh.restproxy import RestProxy
from modelxds.localmesh.runtime import LoadError, MLServerRuntime
from modelxds.modelmesh import (
    Layout,
    ModelRecord,
    Table,
    VModelRecord,
    parse_model,
)
from modelxds.modelmesh.registrar import (
    ModelNotFound,
    PodRegistration,
    claim_copy,
    etcd_client,
    now_ms,
    put_vmodel,
)
from modelxds.placement.model import MeshPlacement
from modelxds.placement.watch import PlacementWatcher

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# Marks a request one pod sent another: it is served where it lands, never forwarded again.
FORWARDED_BY = "x-modelxds-forwarded-by"
# On ModelReady: load the model here and answer when it is ready (vmodel transitions).
ENSURE_LOADED = "x-modelxds-ensure-loaded"


class Metrics:
    """Per-pod counters, so tests and benchmarks can see every in-mesh hop."""

    def __init__(self, instance_id: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"instance": instance_id}

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, list(labels), registry=self.registry).labels(**labels)

        self.local = counter("modelmesh_local_requests_total", "Requests served by this pod")
        self.forwarded = counter(
            "modelmesh_forwarded_requests_total", "Requests this pod forwarded to another pod"
        )
        self.loads = counter("modelmesh_loads_total", "Model loads completed on this pod")
        self.load_failures = counter("modelmesh_load_failures_total", "Model loads that failed")
        self.evictions = counter("modelmesh_evictions_total", "Models evicted (LRU) from this pod")
        self.loaded = Gauge(
            "modelmesh_loaded_models",
            "Models loaded on this pod",
            list(labels),
            registry=self.registry,
        ).labels(**labels)


class MeshNode:
    def __init__(
        self,
        *,
        instance_id: str,
        host: str,
        port: int,
        etcd: str,
        layout: Layout,
        runtime: MLServerRuntime,
        storage: dict[str, Path],
        capacity: int = 8,
        load_concurrency: int = 2,
        loaded_after_ms: int = 3000,
        lease_ttl: int = 10,
        leader: bool = False,
        rest_port: int = 0,
    ) -> None:
        self.instance_id = instance_id
        self.host = host
        self.port = port
        self.rest_port = rest_port  # ModelMesh Serving's REST proxy port; 0: none
        self.layout = layout
        self.runtime = runtime
        self.storage = storage
        self.capacity = capacity
        self.leader = leader
        self.metrics = Metrics(instance_id)
        self.client = etcd_client(etcd)
        self.registration = PodRegistration(
            self.client, layout, instance_id, host, ttl=lease_ttl, capacity=capacity
        )
        self.watcher = PlacementWatcher(etcd, [("mesh", layout)], loaded_after_ms=loaded_after_ms)
        self.placement = MeshPlacement("mesh")
        self.loaded: collections.OrderedDict[str, int] = collections.OrderedDict()  # id -> last use
        self.loading: dict[str, asyncio.Task[None]] = {}
        self.in_flight: collections.Counter[str] = collections.Counter()  # per instance id
        self._serving: collections.Counter[str] = collections.Counter()  # per local model id
        self._load_slots = asyncio.Semaphore(load_concurrency)
        self._peers: dict[str, pb_grpc.GRPCInferenceServiceStub] = {}
        self._channels: list[grpc.aio.Channel] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._placed: collections.Counter[str] = collections.Counter()  # loads under way
        self._vmodel_jobs: set[str] = set()  # "vmodel:target" transitions under way
        self._server: grpc.aio.Server | None = None
        self._rest: RestProxy | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.client.connect()
        self._tasks.append(asyncio.create_task(self.watcher.run()))
        await asyncio.wait_for(self.watcher.synced.wait(), 30)
        self._refresh()
        if self.rest_port:
            # up before the gRPC port opens: whoever waits for that port gets REST as well
            self._rest = RestProxy(self.host, self.rest_port, f"{self.host}:{self.port}")
            await self._rest.start()
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(_Servicer(self), server)
        server.add_insecure_port(f"{self.host}:{self.port}")
        await server.start()
        self._server = server
        await self.registration.register()
        await self._publish_instance()
        self._tasks.append(asyncio.create_task(self._follow_placement()))
        log.info("node %s serving on %s:%d", self.instance_id, self.host, self.port)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._rest is not None:
            await self._rest.stop()
        if self._server is not None:
            await self._server.stop(1)
        with contextlib.suppress(Exception):
            await self.registration.stop(revoke=True)
        for channel in self._channels:
            await channel.close()
        await self.client.close()

    def _refresh(self) -> None:
        self.watcher.changed.clear()
        self.placement = self.watcher.snapshot().meshes["mesh"]
        # loads placed but not finished count as used: a burst of misses spreads out
        self._placed = collections.Counter(
            iid for c in self.placement.models.values() for iid in c.loading
        )

    async def _follow_placement(self) -> None:
        while True:
            await self.watcher.changed.wait()
            await asyncio.sleep(0.02)  # let a burst of events land together
            self._refresh()
            await self._drop_deleted_models()
            if self.leader:
                await self._advance_vmodels()

    # ------------------------------------------------------------------ routing

    def resolve(self, name: str) -> str:
        """A request's model name is a vmodel (InferenceService) id first, else a model id."""
        raw = self.watcher.tables[0].vmodels.get(name)
        if raw is not None:
            return raw.active_model or raw.target_model
        return name

    def route(self, model_id: str, *, balanced: bool) -> str | None:
        """The instance to serve ``model_id``, or None when it is loaded nowhere."""
        here = model_id in self.loaded or model_id in self.loading
        copies = self.placement.models.get(model_id)
        holders = [i for i in (copies.routable if copies else ()) if i in self.placement.instances]
        if here and (balanced or not any(i != self.instance_id for i in holders)):
            return self.instance_id
        candidates = set(holders) | ({self.instance_id} if here else set())
        if not candidates:
            return None
        return min(candidates, key=lambda i: (self.in_flight[i], i != self.instance_id, i))

    def choose_target(self) -> str:
        """Where a miss loads: the pod with most free capacity, then the least recently used."""
        best = min(
            self.placement.instances.values(),
            key=lambda i: (
                i.model_count + self._placed[i.id] - (i.capacity or self.capacity),
                i.lru_time,
                i.id,
            ),
            default=None,
        )
        if best is None:
            return self.instance_id
        self._placed[best.id] += 1  # until the next refresh shows the claim
        return best.id

    async def infer(
        self, request: pb.ModelInferRequest, metadata: dict[str, str]
    ) -> pb.ModelInferResponse:
        model_id, target = await self._target(request.model_name, metadata)
        self.in_flight[target] += 1
        try:
            if target == self.instance_id:
                return await self._serve_here(model_id, request)
            return await self._forward(target, request, metadata)
        finally:
            self.in_flight[target] -= 1

    async def model_metadata(
        self, request: pb.ModelMetadataRequest, metadata: dict[str, str]
    ) -> pb.ModelMetadataResponse:
        """The runtime's metadata of the model, routed (and loaded on a miss) as an
        inference is, but not counted as one: the counters count inferences."""
        model_id, target = await self._target(request.name, metadata)
        if target != self.instance_id:
            response: pb.ModelMetadataResponse = await self._peer(target).ModelMetadata(
                request, metadata=self._hop_headers(metadata), timeout=300
            )
            return response
        self._serving[model_id] += 1  # not evicted while it answers
        try:
            await self.ensure_loaded(model_id)
            return await self.runtime.metadata(model_id)
        finally:
            self._serving[model_id] -= 1

    async def _target(self, name: str, metadata: dict[str, str]) -> tuple[str, str]:
        """(model id, instance to serve it) for a request naming ``name`` (the body's
        name first, then the headers'): placed by compare-and-swap on a miss."""
        name = name or metadata.get("mm-vmodel-id") or metadata.get("mm-model-id") or ""
        if not name:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "request names no model: set model_name, or the header mm-vmodel-id or mm-model-id",
            )
        model_id = self.resolve(name)
        if model_id not in self.watcher.tables[0].registry:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"model {name!r} is not registered")
        if FORWARDED_BY in metadata:
            target: str | None = self.instance_id
        else:
            target = self.route(model_id, balanced=metadata.get("mm-balanced") == "true")
        if target is None:
            live = set(self.placement.instances) | {self.instance_id}
            try:
                target = await claim_copy(
                    self.client, self.layout, model_id, self.choose_target(), live
                )
            except ModelNotFound:
                raise _Abort(
                    grpc.StatusCode.NOT_FOUND, f"model {name!r} is not registered"
                ) from None
        return model_id, target

    async def _serve_here(
        self, model_id: str, request: pb.ModelInferRequest
    ) -> pb.ModelInferResponse:
        self._serving[model_id] += 1
        try:
            await self.ensure_loaded(model_id)
            self.loaded[model_id] = now_ms()
            self.loaded.move_to_end(model_id)
            local = pb.ModelInferRequest()
            local.CopyFrom(request)
            local.model_name = model_id
            response = await self.runtime.infer(local)
            self.metrics.local.inc()
            return response
        finally:
            self._serving[model_id] -= 1

    async def _forward(
        self, target: str, request: pb.ModelInferRequest, metadata: dict[str, str]
    ) -> pb.ModelInferResponse:
        stub = self._peer(target)
        self.metrics.forwarded.inc()
        response: pb.ModelInferResponse = await stub.ModelInfer(
            request, metadata=self._hop_headers(metadata), timeout=300
        )
        return response

    def _peer(self, target: str) -> pb_grpc.GRPCInferenceServiceStub:
        inst = self.placement.instances.get(target)
        if inst is None:
            raise _Abort(grpc.StatusCode.UNAVAILABLE, f"pod {target} is gone")
        stub = self._peers.get(target)
        if stub is None:
            channel = grpc.aio.insecure_channel(f"{inst.host}:{self.port}")
            self._channels.append(channel)
            stub = self._peers[target] = pb_grpc.GRPCInferenceServiceStub(channel)
        return stub

    def _hop_headers(self, metadata: dict[str, str]) -> list[tuple[str, str]]:
        headers = [(k, v) for k, v in metadata.items() if k.startswith("mm-")]
        headers.append((FORWARDED_BY, self.instance_id))
        return headers

    # ------------------------------------------------------------------ loading

    async def ensure_loaded(self, model_id: str) -> None:
        """Load once, however many requests wait for it."""
        if model_id in self.loaded:
            return
        task = self.loading.get(model_id)
        if task is None:
            task = self.loading[model_id] = asyncio.create_task(self._load(model_id))
            task.add_done_callback(lambda _: self.loading.pop(model_id, None))
        await asyncio.shield(task)

    async def _load(self, model_id: str) -> None:
        async with self._load_slots:  # loads beyond the limit queue here
            record = await self._record(model_id)
            await self._make_room()
            copies = self.placement.models.get(model_id)
            listed = copies is not None and self.instance_id in (copies.loading + copies.loaded)
            if not listed:
                await self.registration.add_copy(model_id)  # "load started"
            try:
                model_format, uri = self._locate(record)
                await self.runtime.load(model_id, model_format, uri)
            except LoadError as e:
                self.metrics.load_failures.inc()
                log.warning("node %s: load of %s failed: %s", self.instance_id, model_id, e)
                await self.registration.fail_copy(model_id)
                raise _Abort(grpc.StatusCode.INTERNAL, f"loading {model_id} failed: {e}") from None
            self.loaded[model_id] = now_ms()
            self.metrics.loads.inc()
            self.metrics.loaded.set(len(self.loaded))
            log.info("node %s loaded %s", self.instance_id, model_id)
        await self._publish_instance()

    async def _record(self, model_id: str) -> ModelRecord:
        got = await self.client.get(self.layout.key(Table.REGISTRY, model_id).encode())
        if got is None:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"model {model_id!r} is not registered")
        return parse_model(got.value)

    def _locate(self, record: ModelRecord) -> tuple[str, Path]:
        """(model format, file) from the record's type and storage key (``encKey``)."""
        model_format = record.type.split(":", 1)[-1]
        storage_key = ""
        with contextlib.suppress(ValueError, AttributeError):
            storage_key = json.loads(record.encryption_key or "{}").get("storage_key", "")
        root = self.storage.get(storage_key) or next(iter(self.storage.values()), None)
        if root is None:
            raise LoadError(f"no storage configured for key {storage_key!r}")
        return model_format, root / record.model_path

    async def _make_room(self) -> None:
        """Evict least recently used models (not mid-request) until one more fits."""
        while len(self.loaded) + 1 > self.capacity:
            victim = next((m for m in self.loaded if self._serving[m] == 0), None)
            if victim is None:
                return  # everything is busy: run over capacity rather than fail requests
            await self._unload(victim)
            self.metrics.evictions.inc()

    async def _unload(self, model_id: str) -> None:
        self.loaded.pop(model_id, None)
        self.metrics.loaded.set(len(self.loaded))
        await self.runtime.unload(model_id)
        with contextlib.suppress(ModelNotFound, Exception):
            await self.registration.remove_copy(model_id)
        log.info("node %s unloaded %s", self.instance_id, model_id)
        await self._publish_instance()

    async def _drop_deleted_models(self) -> None:
        for model_id in [m for m in self.loaded if m not in self.watcher.tables[0].registry]:
            if self._serving[model_id] == 0:
                await self._unload(model_id)

    async def _publish_instance(self) -> None:
        await self.registration.publish_instance(
            self.loaded.values(), loads_in_progress=len(self.loading)
        )

    # ------------------------------------------------------------------ vmodels (leader)

    async def _advance_vmodels(self) -> None:
        """Move each InferenceService to its target model once that model is loaded."""
        for vmodel_id, rec in list(self.watcher.tables[0].vmodels.items()):
            if not rec.target_model or rec.target_model == rec.active_model or rec.target_failed:
                continue
            key = f"{vmodel_id}:{rec.target_model}"
            if key not in self._vmodel_jobs:
                self._vmodel_jobs.add(key)
                job = asyncio.create_task(self._transition(vmodel_id, rec))
                job.add_done_callback(functools.partial(_discard, self._vmodel_jobs, key))

    async def _transition(self, vmodel_id: str, rec: VModelRecord) -> None:
        target_model = rec.target_model
        ok = True
        try:
            live = set(self.placement.instances) | {self.instance_id}
            where = await claim_copy(
                self.client, self.layout, target_model, self.choose_target(), live
            )
            if where == self.instance_id:
                await self.ensure_loaded(target_model)
            else:
                inst = self.placement.instances[where]
                async with grpc.aio.insecure_channel(f"{inst.host}:{self.port}") as channel:
                    await pb_grpc.GRPCInferenceServiceStub(channel).ModelReady(
                        pb.ModelReadyRequest(name=target_model),
                        metadata=[(ENSURE_LOADED, "true")],
                        timeout=300,
                    )
        except Exception as e:  # any failure leaves the old model serving
            log.warning("InferenceService %s: target %s failed: %s", vmodel_id, target_model, e)
            ok = False
        current = self.watcher.tables[0].vmodels.get(vmodel_id, rec)
        if current.target_model != target_model:
            return  # changed again meanwhile; that change has its own job
        update = (
            VModelRecord(owner=current.owner, active_model=target_model, target_model=target_model)
            if ok
            else VModelRecord(
                owner=current.owner,
                active_model=current.active_model,
                target_model=target_model,
                target_failed=True,
            )
        )
        await put_vmodel(self.client, self.layout, vmodel_id, update)


def _discard(jobs: set[str], key: str, _: object) -> None:
    jobs.discard(key)


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Servicer(AlwaysServing):
    def __init__(self, node: MeshNode) -> None:
        self.node = node

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return await _answer(self.node.infer(request, _metadata(context)), context)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        metadata = _metadata(context)
        model_id = self.node.resolve(request.name)
        if metadata.get(ENSURE_LOADED) == "true":
            try:
                await self.node.ensure_loaded(model_id)
            except _Abort as e:
                await context.abort(e.code, e.message)
        copies = self.node.placement.models.get(model_id)
        ready = model_id in self.node.loaded or bool(copies and copies.routable)
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="modelxds-localmesh", version=self.node.instance_id)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        return await _answer(self.node.model_metadata(request, _metadata(context)), context)


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}


async def _answer(call: Awaitable[_T], context: grpc.aio.ServicerContext) -> _T:
    """The node's answer, or its error (its own, or a peer's or the runtime's) as the
    call's status."""
    try:
        return await call
    except _Abort as e:
        await context.abort(e.code, e.message)
    except grpc.aio.AioRpcError as e:
        await context.abort(e.code(), e.details() or "runtime error")
    raise AssertionError("unreachable")  # abort() raises


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m modelxds.localmesh.node",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", required=True, help="this pod's address, e.g. 127.0.0.11")
    p.add_argument("--port", type=int, default=8033, help="KServe V2 gRPC port")
    p.add_argument(
        "--rest-port",
        type=int,
        default=8008,
        help="KServe V2 REST port (ModelMesh Serving's REST proxy); 0 disables it",
    )
    p.add_argument("--instance-id", required=True)
    p.add_argument("--etcd", default="http://127.0.0.1:2379")
    p.add_argument("--root-prefix", default="modelmesh-serving")
    p.add_argument("--service-name", default="modelmesh-serving")
    p.add_argument(
        "--storage",
        action="append",
        default=[],
        metavar="KEY=DIR",
        help="storage key -> local directory (e.g. localMinIO=.run/models)",
    )
    p.add_argument("--capacity", type=int, default=8, help="models this pod holds at once")
    p.add_argument("--load-concurrency", type=int, default=2)
    p.add_argument("--loaded-after-ms", type=int, default=3000)
    p.add_argument("--lease-ttl", type=int, default=10)
    p.add_argument("--runtime-http-port", type=int, default=8080)
    p.add_argument("--runtime-grpc-port", type=int, default=8081)
    p.add_argument("--metrics-port", type=int, default=2112)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument(
        "--leader",
        action="store_true",
        help="drive InferenceService transitions (one pod per mesh)",
    )
    return p.parse_args(argv)


async def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s %(levelname)s {args.instance_id}: %(message)s"
    )
    storage = {}
    for item in args.storage:
        key, sep, folder = item.partition("=")
        if not sep:
            print(f"error: --storage expects KEY=DIR, got {item!r}", file=sys.stderr)
            return 2
        storage[key] = Path(folder).resolve()
    runtime = MLServerRuntime(
        args.host, args.runtime_http_port, args.runtime_grpc_port, args.workdir / "mlserver"
    )
    await asyncio.to_thread(runtime.start)
    node = MeshNode(
        instance_id=args.instance_id,
        host=args.host,
        port=args.port,
        etcd=args.etcd,
        layout=Layout(args.root_prefix, args.service_name),
        runtime=runtime,
        storage=storage,
        capacity=args.capacity,
        load_concurrency=args.load_concurrency,
        loaded_after_ms=args.loaded_after_ms,
        lease_ttl=args.lease_ttl,
        leader=args.leader,
        rest_port=args.rest_port,
    )
    start_http_server(args.metrics_port, args.host, registry=node.metrics.registry)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        await node.start()
        # What exists now (imports, channels, the etcd client) lives as long as the
        # process: frozen out of the collector's way, a full collection walks only what
        # requests allocated since. Unfrozen, this process's first full collection under
        # load stops it for 20-30 ms on the benchmark machine, a pause ModelMesh's own
        # (Java) router would not add to a forwarded request.
        gc.collect()
        gc.freeze()
        await stop.wait()
    finally:
        await node.stop()
        await runtime.stop()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
