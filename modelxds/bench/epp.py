"""The endpoint picker's capacity, scale and per-pick cost.

    python -m modelxds.bench.epp --out bench-results/epp.json

The picker (the ``Processor`` `modelxds epp` serves, fed a placement built from the
record tables bench.scale uses, without etcd) runs in a process of its own pinned to
CPU 0. The load generator, this process, is pinned to CPU 1 and speaks ext_proc as
Envoy does: a few HTTP/2 channels, one ``Process`` stream per request.

* capacity: open-loop steps of offered rate, each request a stream that sends the
  request headers (``:path /v2/models/<m>/infer``, or gRPC with ``mm-vmodel-id``),
  waits for the headers response and ends; then the same for a gRPC call naming the
  model only in its 1 KB body (headers, one body chunk, both answers back).
  The headers steps again against a gRPC floor: the same streams, prebuilt answers.
* scale: start-to-ready, RSS and latency at a modest rate with large placements.
* in context: at bench.compare's size, also a whole gRPC call's stream (request, then
  response headers, body and trailers, each after the answer before).
* profile: one pick's steps timed in this process, without gRPC.

Latency is the client's round trip: from opening the stream to the answer, so it holds
the gRPC work of both sides and the loopback, not Envoy's own ext_proc client.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import resource
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from modelxds import metrics
from modelxds.bench.build import NOW, tables
from modelxds.bench.common import machine, summary_ms, write_result
from modelxds.epp.exchange import DESTINATION_HEADER, Exchange
from modelxds.epp.pick import Picker
from modelxds.epp.server import Pool, Processor
from modelxds.kserve import grpc_predict_v2_pb2 as pb
from modelxds.placement.index import Changes, MeshIndex
from modelxds.placement.model import Placement
from modelxds.policy import default_policy

PROCESS = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
NAMESPACE = "modelmesh-serving"
TARGET_PORT = 8033
PICKER_CPU, LOAD_CPU = 0, 1
INFER = "/inference.GRPCInferenceService/ModelInfer"
BODY_BYTES = 1024


# --- the picker's process ---------------------------------------------------------


def placement(models: int, pods: int) -> tuple[Placement, dict[str, Any]]:
    """The placement `modelxds epp` holds after reading ``models`` models (3 copies each,
    every one an InferenceService) on ``pods`` pods, and the record tables behind it."""
    t = tables(models, pods, 3)
    changes = Changes()
    changes.all(t["registry"], t["vmodels"])
    mesh = MeshIndex(NAMESPACE).refresh(changes, now_ms=NOW, **t)
    return Placement({NAMESPACE: mesh}), t


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, from /proc (clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pick_histogram() -> dict[str, Any]:
    """``modelxds_epp_pick_seconds`` as now: count, sum and cumulative buckets."""
    out: dict[str, Any] = {"buckets": {}}
    for family in metrics.EPP_PICK_SECONDS.collect():
        for s in family.samples:
            if s.name.endswith("_bucket"):
                out["buckets"][s.labels["le"]] = int(s.value)
            elif s.name.endswith("_count"):
                out["count"] = int(s.value)
            elif s.name.endswith("_sum"):
                out["sum_s"] = s.value
    return out


def _floor_handler(answer: bytes) -> grpc.GenericRpcHandler:
    """ext_proc that answers every message with the same bytes, parsing nothing: what
    a Python gRPC stream costs before any picking."""

    async def process(requests: Any, context: Any) -> Any:
        async for _ in requests:
            yield answer

    return grpc.method_handlers_generic_handler(
        PROCESS.split("/")[1], {"Process": grpc.stream_stream_rpc_method_handler(process)}
    )


def serve_picker(models: int, pods: int, floor: bool, conn: Connection) -> None:
    """The picker's process: build the placement, serve ext_proc on a free loopback
    port, answer ``"stats"`` on ``conn`` with the pick histogram, stop on ``"stop"``.
    ``floor``: serve a prebuilt answer instead of the Processor."""
    os.sched_setaffinity(0, {PICKER_CPU})

    async def run() -> None:
        started = time.perf_counter()
        pool = Pool(default_policy())
        # the records stay referenced, as the watcher holds them beside the placement
        built, records = placement(models, pods)
        pool.update(built)
        server = grpc.aio.server()
        processor = Processor(pool, Picker(TARGET_PORT))
        if floor:
            exchange = Exchange(pool.current, processor.picker, pool.headers)
            blob = ep.ProcessingRequest.FromString(headers_only("model-0", rest=True)[0][0])
            server.add_generic_rpc_handlers(
                [_floor_handler(exchange.handle(blob)[0].SerializeToString())]
            )
        else:
            ep_grpc.add_ExternalProcessorServicer_to_server(processor, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        conn.send({"port": port, "build_s": time.perf_counter() - started})
        while (command := await asyncio.to_thread(conn.recv)) != "stop":
            if command == "stats":
                conn.send(_pick_histogram())
        await server.stop(0)
        del records

    asyncio.run(run())


@dataclass
class PickerProcess:
    """The picker's process as the load generator sees it."""

    process: multiprocessing.process.BaseProcess
    conn: Connection
    port: int
    ready_s: float
    build_s: float

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def histogram(self) -> dict[str, Any]:
        self.conn.send("stats")
        answer: dict[str, Any] = self.conn.recv()
        return answer

    def stop(self) -> None:
        self.conn.send("stop")
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def start_picker(models: int, pods: int, floor: bool = False) -> PickerProcess:
    """Start the picker's process and wait until it serves; ``ready_s`` from the
    process start (interpreter and imports included) to serving."""
    ours, theirs = multiprocessing.Pipe()
    started = time.perf_counter()
    process = multiprocessing.get_context("spawn").Process(
        target=serve_picker, args=(models, pods, floor, theirs), daemon=True
    )
    process.start()
    hello = ours.recv()
    return PickerProcess(
        process, ours, hello["port"], time.perf_counter() - started, hello["build_s"]
    )


# --- the load generator -----------------------------------------------------------


# the serialized messages of one stream: stages, each sent whole before its answers are read
Request = list[list[bytes]]


def _header_map(pairs: dict[str, str]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]
    )


def _headers(pairs: dict[str, str], end_of_stream: bool) -> bytes:
    message = ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(headers=_header_map(pairs), end_of_stream=end_of_stream)
    )
    blob: bytes = message.SerializeToString()
    return blob


def headers_only(model: str, rest: bool) -> Request:
    """A request whose model is in its headers, as Envoy sends its request headers."""
    if rest:
        pairs = {
            ":method": "POST",
            ":path": f"/v2/models/{model}/infer",
            "content-type": "application/json",
        }
    else:
        pairs = {":method": "POST", ":path": INFER, "content-type": "application/grpc"}
        pairs["mm-vmodel-id"] = model
    pairs[":authority"] = "gateway"
    pairs[":scheme"] = "http"
    return [[_headers(pairs, end_of_stream=False)]]


def in_body(model: str) -> Request:
    """A gRPC ModelInfer naming the model only in its body: headers, then one
    ``BODY_BYTES`` chunk with end_of_stream."""
    pairs = {
        ":method": "POST",
        ":path": INFER,
        ":authority": "gateway",
        ":scheme": "http",
        "content-type": "application/grpc",
        "te": "trailers",
    }
    padding = BODY_BYTES
    for _ in range(3):  # the length prefix's own size settles in two rounds
        message = pb.ModelInferRequest(
            model_name=model, raw_input_contents=[b"\0" * padding]
        ).SerializeToString()
        frame = b"\0" + len(message).to_bytes(4, "big") + message
        padding += BODY_BYTES - len(frame)
    body = ep.ProcessingRequest(request_body=ep.HttpBody(body=frame, end_of_stream=True))
    return [[_headers(pairs, end_of_stream=False), body.SerializeToString()]]


def whole_call(model: str) -> Request:
    """A gRPC ModelInfer's whole stream as Envoy sends it with the GIE modes: the
    request (headers, model in the 1 KB body), then the response's headers, one body
    chunk and trailers, each after the answer to the one before."""
    response = pb.ModelInferResponse(
        model_name=model, raw_output_contents=[b"\0" * BODY_BYTES]
    ).SerializeToString()
    frame = b"\0" + len(response).to_bytes(4, "big") + response
    status = {":status": "200", "content-type": "application/grpc"}
    return [
        *in_body(model),
        [
            ep.ProcessingRequest(
                response_headers=ep.HttpHeaders(headers=_header_map(status))
            ).SerializeToString()
        ],
        [
            ep.ProcessingRequest(
                response_body=ep.HttpBody(body=frame, end_of_stream=False)
            ).SerializeToString()
        ],
        [
            ep.ProcessingRequest(
                response_trailers=ep.HttpTrailers(trailers=_header_map({"grpc-status": "0"}))
            ).SerializeToString()
        ],
    ]


@dataclass
class Step:
    latencies: list[float] = field(default_factory=list)
    request_path: list[float] = field(default_factory=list)  # the first stage's answers
    errors: Counter[str] = field(default_factory=Counter)
    late: int = 0  # streams started more than 2 ms after their due time


async def one(channel: grpc.aio.Channel, request: Request, step: Step) -> None:
    """One HTTP request's stream: each stage's messages, then one answer per message
    (each is answered: a picked headers response, an echoed chunk), then the next
    stage; then the stream ends. The first answer must carry the pick."""
    started = time.perf_counter()
    call = channel.stream_stream(PROCESS)()
    try:
        for n, stage in enumerate(request):
            for message in stage:
                await call.write(message)
            answers = [await call.read() for _ in stage]
            if n == 0:
                step.request_path.append(time.perf_counter() - started)
                first = answers[0]
                if not isinstance(first, bytes) or DESTINATION_HEADER.encode() not in first:
                    step.errors["no_pick"] += 1
        step.latencies.append(time.perf_counter() - started)
        await call.done_writing()
        await call.read()  # the end of the stream, as the server closes it
    except grpc.aio.AioRpcError as e:
        step.errors[e.code().name] += 1
    except asyncio.InvalidStateError:  # the server ended the stream (overload)
        step.errors["ended_early"] += 1


async def open_loop(
    channels: list[grpc.aio.Channel], requests: list[Request], rate: float, seconds: float
) -> Step:
    """Start ``rate`` streams a second for ``seconds``, on time whatever the answers do
    (open loop); each due stream starts on the next turn of the loop."""
    step = Step()
    total = int(rate * seconds)
    running: set[asyncio.Task[None]] = set()
    t0 = time.perf_counter()
    sent = 0
    while sent < total:
        now = time.perf_counter()
        due = min(total, int((now - t0) * rate) + 1)
        for n in range(sent, due):
            if now - (t0 + n / rate) > 0.002:
                step.late += 1
            task = asyncio.create_task(
                one(channels[n % len(channels)], requests[n % len(requests)], step)
            )
            running.add(task)
            task.add_done_callback(running.discard)
        sent = due
        await asyncio.sleep(max(0.0, t0 + sent / rate - time.perf_counter()))
    if running:
        await asyncio.wait(running, timeout=30)
    return step


async def drive(
    port: int,
    picker_pid: int,
    requests: list[Request],
    rates: list[float],
    seconds: float,
    channels: int,
) -> list[dict[str, Any]]:
    opened = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(channels)]
    try:
        await open_loop(opened, requests, 200, 1.0)  # connections up, code paths warm
        out = []
        for rate in rates:
            cpu0, own0 = _cpu_seconds(picker_pid), _own_cpu()
            t0 = time.perf_counter()
            step = await open_loop(opened, requests, rate, seconds)
            wall = time.perf_counter() - t0
            cpu = _cpu_seconds(picker_pid) - cpu0
            row: dict[str, Any] = {
                "offered_per_s": rate,
                "completed_per_s": round(len(step.latencies) / wall, 1),
                "errors": sum(step.errors.values()),
                "error_codes": dict(step.errors),
                "started_late_fraction": round(step.late / max(1, int(rate * seconds)), 3),
                "latency": summary_ms(step.latencies) if step.latencies else {},
                **(
                    {"request_path_latency": summary_ms(step.request_path)}
                    if any(len(r) > 1 for r in requests) and step.request_path
                    else {}
                ),
                "picker_cpu_fraction": round(cpu / wall, 2),
                "picker_cpu_us_per_request": round(cpu / max(1, len(step.latencies)) * 1e6),
                "loadgen_cpu_fraction": round((_own_cpu() - own0) / wall, 2),
                "picker_rss_mb": round(_rss_mb(picker_pid), 1),
            }
            out.append(row)
            print(_line(row), flush=True)
        return out
    finally:
        for c in opened:
            await c.close()


def _own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _line(row: dict[str, Any]) -> str:
    lat = row["latency"]
    return (
        f"  {row['offered_per_s']:>6.0f}/s offered, {row['completed_per_s']:>7.1f}/s done, "
        f"p50 {lat.get('p50_ms')} ms p99 {lat.get('p99_ms')} ms, picker CPU "
        f"{row['picker_cpu_fraction']:.0%} ({row['picker_cpu_us_per_request']} us/req), "
        f"loadgen CPU {row['loadgen_cpu_fraction']:.0%}, late "
        f"{row['started_late_fraction']:.1%}, errors {row['errors']}"
    )


def mix(models: int, kind: str, n: int = 1000, seed: int = 5) -> list[Request]:
    """``n`` requests for random models (their InferenceService names): ``headers``
    alternates REST paths and gRPC ``mm-vmodel-id``; ``body`` names them in the body."""
    rnd = random.Random(seed)
    names = [f"model-{rnd.randrange(models)}" for _ in range(n)]
    if kind == "body":
        return [in_body(m) for m in names]
    if kind == "call":
        return [whole_call(m) for m in names]
    return [headers_only(m, rest=i % 2 == 0) for i, m in enumerate(names)]


def first_over(rows: list[dict[str, Any]], limit_ms: float) -> float | None:
    """The lowest offered rate whose p99 is over ``limit_ms`` (or that failed), if any."""
    for row in rows:
        if row["errors"] or not row["latency"] or row["latency"]["p99_ms"] > limit_ms:
            return float(row["offered_per_s"])
    return None


def capacity(
    models: int, pods: int, rates: list[float], seconds: float, channels: int
) -> dict[str, Any]:
    picker = start_picker(models, pods)
    try:
        result: dict[str, Any] = {"models": models, "pods": pods, "channels": channels}
        for kind in ("headers", "body"):
            print(f"capacity, {kind}, {models}/{pods}:", flush=True)
            rows = asyncio.run(
                drive(picker.port, picker.pid, mix(models, kind), rates, seconds, channels)
            )
            result[kind] = {
                "steps": rows,
                "p99_over_1ms_from_per_s": first_over(rows, 1.0),
            }
        result["pick_histogram"] = picker.histogram()
    finally:
        picker.stop()
    floor = start_picker(models, pods, floor=True)
    try:
        print("gRPC floor (a prebuilt answer, no picking), headers:", flush=True)
        rows = asyncio.run(
            drive(floor.port, floor.pid, mix(models, "headers"), rates, seconds, channels)
        )
        result["grpc_floor_headers"] = {
            "steps": rows,
            "p99_over_1ms_from_per_s": first_over(rows, 1.0),
        }
    finally:
        floor.stop()
    return result


def scale(models: int, pods: int, rate: float, seconds: float, channels: int) -> dict[str, Any]:
    picker = start_picker(models, pods)
    try:
        rss_ready = _rss_mb(picker.pid)
        print(
            f"scale {models}/{pods}: ready in {picker.ready_s:.1f} s "
            f"(placement {picker.build_s:.1f} s), RSS {rss_ready:.0f} MB",
            flush=True,
        )
        rows = {
            kind: asyncio.run(
                drive(picker.port, picker.pid, mix(models, kind), [rate], seconds, channels)
            )[0]
            for kind in ("headers", "body")
        }
        histogram = picker.histogram()
        return {
            "models": models,
            "pods": pods,
            # process start (interpreter, imports) to serving; records generated in
            # process, so etcd's read and the records' parsing are not in it
            "start_to_ready_s": round(picker.ready_s, 2),
            "placement_build_s": round(picker.build_s, 2),
            "rss_mb_ready": round(rss_ready, 1),
            "rss_mb_after_load": round(_rss_mb(picker.pid), 1),
            "mean_pick_us": round(histogram["sum_s"] / max(1, histogram["count"]) * 1e6, 1),
            **rows,
        }
    finally:
        picker.stop()


def in_context(models: int, pods: int, rate: float, seconds: float) -> dict[str, Any]:
    """At bench.compare's size and rate: what each kind of request spends in ext_proc,
    a whole gRPC call's stream included, against the gRPC floor for the same streams."""
    out: dict[str, Any] = {"models": models, "pods": pods, "rate_per_s": rate}
    for floor in (False, True):
        picker = start_picker(models, pods, floor=floor)
        name = "grpc_floor" if floor else "picker"
        try:
            for kind in ("headers", "body", "call"):
                print(f"in context, {name}, {kind}:", flush=True)
                (row,) = asyncio.run(
                    drive(picker.port, picker.pid, mix(models, kind), [rate], seconds, 2)
                )
                out[f"{name}_{kind}"] = row
        finally:
            picker.stop()
    return out


# --- one pick, in process ---------------------------------------------------------


def profile(models: int, pods: int, rounds: int) -> dict[str, Any]:
    """The steps one headers-only request costs the picker, without gRPC: parse the
    message, the Exchange (headers, model, pick, response), serialize the answer; and
    the pick alone. Medians in microseconds."""
    built, _ = placement(models, pods)
    pool = Pool(default_policy())
    pool.update(built)
    destination = pool.current()
    assert destination is not None
    picker = Picker(TARGET_PORT)
    blobs = [r[0][0] for r in mix(models, "headers", n=200)]
    steps: dict[str, list[int]] = {"parse": [], "exchange": [], "serialize": [], "pick": []}
    clock: Callable[[], int] = time.perf_counter_ns
    for n in range(rounds):
        blob = blobs[n % len(blobs)]
        t0 = clock()
        message = ep.ProcessingRequest.FromString(blob)
        t1 = clock()
        answers = Exchange(pool.current, picker, pool.headers).handle(message)
        t2 = clock()
        for a in answers:
            a.SerializeToString()
        t3 = clock()
        picker.pick(destination, f"model-{n % models}")
        t4 = clock()
        for name, took in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            steps[name].append(took)
    return {
        "models": models,
        "pods": pods,
        "rounds": rounds,
        **{f"{k}_us": round(statistics.median(v) / 1000, 1) for k, v in steps.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="bench-results/epp.json")
    p.add_argument("--size", default="20000x100", help="capacity runs' MODELSxPODS")
    p.add_argument("--rates", default="250,500,1000,1500,2000,2500,3000")
    p.add_argument("--seconds", type=float, default=10.0, help="per rate step")
    p.add_argument("--channels", type=int, default=4, help="HTTP/2 connections, as Envoy's")
    p.add_argument("--scale-sizes", default="300000x8,100000x500")
    p.add_argument("--scale-rate", type=float, default=200.0)
    p.add_argument("--profile-sizes", default="60x3,20000x100,100000x500")
    p.add_argument("--profile-rounds", type=int, default=20000)
    args = p.parse_args()
    os.sched_setaffinity(0, {LOAD_CPU})
    models, pods = (int(x) for x in args.size.split("x"))
    rates = [float(r) for r in args.rates.split(",")]
    result: dict[str, Any] = {"benchmark": "epp", "machine": machine()}
    result["capacity"] = capacity(models, pods, rates, args.seconds, args.channels)
    result["scale"] = []
    for size in filter(None, args.scale_sizes.split(",")):
        m, n = (int(x) for x in size.split("x"))
        result["scale"].append(scale(m, n, args.scale_rate, args.seconds, args.channels))
    result["in_context"] = in_context(60, 3, 100, args.seconds)
    result["profile"] = []
    for size in filter(None, args.profile_sizes.split(",")):
        m, n = (int(x) for x in size.split("x"))
        row = profile(m, n, args.profile_rounds)
        print(f"profile {size}: {row}", flush=True)
        result["profile"].append(row)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
