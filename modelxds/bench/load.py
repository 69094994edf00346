"""A fortio-style load generator: fixed QPS, fixed connections, fixed duration.

Each connection keeps its own schedule (``connections / qps`` apart, +-10 % with
-jitter). Latency is measured from the *scheduled* send time, so a slow response
that delays the next request shows up in that request's latency too (coordinated
omission: a closed loop that waits would hide exactly the stalls we look for).

REST is plain HTTP/1.1 with keep-alive; gRPC is one HTTP/2 channel per connection.
``{model}`` in the URL, headers and payload is a model drawn at random (seeded) from
``models`` for each request, so one run spreads over many models.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import json
import random
import re
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
from google.protobuf import json_format

from modelxds.bench.stats import duration_histogram, percentile, summary_line

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


@dataclass
class LoadSpec:
    url: str  # http://host:port/path for REST; host:port (or grpc://host:port) with grpc
    qps: float = 8.0  # 0: as fast as each connection can go
    connections: int = 1
    duration: float = 5.0
    headers: list[tuple[str, str]] = field(default_factory=list)
    payload: bytes = b""  # REST body; for gRPC the ModelInferRequest in protobuf JSON
    grpc: bool = False
    jitter: bool = False
    models: list[str] = field(default_factory=list)
    # per model, where to send it instead of ``url`` (direct-to-holder runs)
    target: Callable[[str], str] | None = None
    # -c 1 only: wake PRECISE_MARGIN early and sleep the rest blocking, so a request leaves
    # ~0.1 ms after its slot instead of ~0.7-1.2 ms (epoll rounds asyncio's timers up to
    # whole milliseconds); with more connections it would hold the others up
    precise: bool = False
    labels: str = ""  # fortio's -labels; empty: fortio's default (target and host name)


PRECISE_MARGIN = 0.0025


@dataclass
class Recorder:
    latencies: list[float] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)  # send time - scheduled time
    codes: Counter[str] = field(default_factory=Counter)
    errors: list[float] = field(default_factory=list)  # latencies of failed requests

    def add(self, latency: float, code: str, lag: float = 0.0) -> None:
        self.latencies.append(latency)
        self.lags.append(lag)
        self.codes[code] += 1
        if not _succeeded(code):
            self.errors.append(latency)


def _succeeded(code: str) -> bool:
    return code == "OK" or code.startswith("2")


async def run(spec: LoadSpec, progress: Callable[[float], None] | None = None) -> dict[str, Any]:
    """Run the load; the result has fortio's JSON shape (DurationHistogram, RetCodes, ...)."""
    rec = Recorder()
    names = spec.models or [""]
    started_at = datetime.datetime.now().astimezone()
    start = time.perf_counter()
    end = start + spec.duration
    interval = spec.connections / spec.qps if spec.qps > 0 else 0.0
    precise = spec.precise and spec.connections == 1

    async def connection(index: int) -> None:
        rnd = random.Random(index)
        send: _HttpSender | _GrpcSender = _GrpcSender(spec) if spec.grpc else _HttpSender(spec)
        try:
            # The k-th request of connection i is due at (k + i/c) intervals: computed,
            # not accumulated, so float error never adds or drops a request. Connections
            # are staggered over one interval, as fortio does.
            for k in itertools.count():
                slot = (k + index / spec.connections) * interval
                if slot >= spec.duration - 1e-9 or (not interval and time.perf_counter() >= end):
                    break
                if spec.jitter and k:
                    slot += interval * rnd.uniform(-0.1, 0.1)
                due = start + slot
                if interval and due > time.perf_counter():
                    margin = PRECISE_MARGIN if precise else 0.0
                    if due - time.perf_counter() > margin:
                        await asyncio.sleep(due - time.perf_counter() - margin)
                    if precise and due > time.perf_counter():
                        time.sleep(due - time.perf_counter())
                scheduled = due if interval else time.perf_counter()
                # random, not round robin: a cycle could line up with a round-robin
                # balancer and make every request hit (or miss) a holder
                model = rnd.choice(names)
                sent = time.perf_counter()
                code = await send(model)
                rec.add(time.perf_counter() - scheduled, code, sent - scheduled)
        finally:
            await send.close()

    async def tick() -> None:
        while progress is not None:
            progress(min(1.0, (time.perf_counter() - start) / spec.duration))
            await asyncio.sleep(0.25)

    ticker = asyncio.create_task(tick())
    try:
        await asyncio.gather(*(connection(i) for i in range(spec.connections)))
    finally:
        ticker.cancel()
    elapsed = time.perf_counter() - start
    labels = spec.labels or default_labels(spec.url)
    # fortio's RunnerResults field names and types, so fortio's report UI (and ours)
    # reads either tool's file
    return {
        "RunType": "GRPC" if spec.grpc else "HTTP",
        "Labels": labels,
        "StartTime": _go_time(started_at),
        "RequestedQPS": f"{spec.qps:.9g}" if spec.qps > 0 else "max",
        "RequestedDuration": go_duration(spec.duration),
        "ActualQPS": len(rec.latencies) / elapsed,
        "ActualDuration": int(elapsed * 1e9),
        "NumThreads": spec.connections,
        "Version": f"modelxds {_version()}",
        "DurationHistogram": duration_histogram(rec.latencies),
        "ErrorsDurationHistogram": duration_histogram(rec.errors),
        "Jitter": spec.jitter,
        "ID": result_id(started_at, labels),
        ("Destination" if spec.grpc else "URL"): spec.url,
        # how late the generator itself sent (included in DurationHistogram): the same
        # for every target, so it cancels in comparisons but not in absolute numbers
        "SendLag": _lag_summary(rec.lags),
        "RetCodes": dict(rec.codes),
        "Samples": rec.latencies,  # raw, for merging runs; not part of fortio's JSON
    }


def default_labels(url: str) -> str:
    """fortio's default -labels: the target without its scheme, then the short host name."""
    target = url.removeprefix("https://").removeprefix("http://")
    return f"{target} , {socket.gethostname().split('.', 1)[0]}"


def result_id(when: datetime.datetime, labels: str) -> str:
    """fortio's result ID, the file name -a saves under (without .json):
    ``YYYY-MM-DD-HHMMSS_<labels>``, every run of other characters in the labels one
    ``_``, at most 96 characters."""
    words = "_".join(re.findall(r"[A-Za-z0-9]+", labels))
    base = when.strftime("%Y-%m-%d-%H%M%S")
    return (f"{base}_{words}" if words else base)[:96]


def go_duration(seconds: float) -> str:
    """A duration as Go prints one (``5s``, ``1m0s``, ``250ms``), as fortio's JSON has it."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    text = f"{secs:.9f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    return f"{minutes}m{text}" if minutes else text


def _go_time(when: datetime.datetime) -> str:
    # Go's time.Time in JSON: RFC 3339 with the zone's offset, "Z" for UTC
    text = when.isoformat()
    return text.removesuffix("+00:00") + "Z" if text.endswith("+00:00") else text


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("modelxds")
    except PackageNotFoundError:
        return "unknown"


def _lag_summary(lags: list[float]) -> dict[str, float]:
    if not lags:
        return {}
    return {"p50": percentile(lags, 50), "p99": percentile(lags, 99), "mean": sum(lags) / len(lags)}


def _fill(text: str, model: str) -> str:
    return text.replace("{model}", model)


class _HttpSender:
    """One keep-alive HTTP/1.1 connection; reconnects after an error."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.conns: dict[tuple[str, int], tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}

    async def __call__(self, model: str) -> str:
        url = urlsplit(_fill(self.spec.target(model) if self.spec.target else self.spec.url, model))
        host, port = url.hostname or "127.0.0.1", url.port or 80
        body = _fill(self.spec.payload.decode(), model).encode()
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        head = [
            f"{'POST' if body else 'GET'} {path} HTTP/1.1",
            f"host: {host}:{port}",
            f"content-length: {len(body)}",
        ]
        head += [f"{k}: {_fill(v, model)}" for k, v in self.spec.headers]
        if body and not any(k.lower() == "content-type" for k, _ in self.spec.headers):
            head.append("content-type: application/json")
        request = ("\r\n".join(head) + "\r\n\r\n").encode() + body
        try:
            if (host, port) not in self.conns:
                self.conns[(host, port)] = await asyncio.open_connection(host, port)
            reader, writer = self.conns[(host, port)]
            writer.write(request)
            return await _read_response(reader)
        except (OSError, asyncio.IncompleteReadError, ValueError) as e:
            self.conns.pop((host, port), None)
            return f"error:{type(e).__name__}"

    async def close(self) -> None:
        for _, writer in self.conns.values():
            writer.close()


async def _read_response(reader: asyncio.StreamReader) -> str:
    status = (await reader.readline()).decode().split(" ", 2)
    if len(status) < 2:
        raise ValueError("bad status line")
    length, chunked = 0, False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
        elif name.lower() == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    if chunked:
        while size := int((await reader.readline()).strip() or b"0", 16):
            await reader.readexactly(size + 2)
        await reader.readline()
    else:
        await reader.readexactly(length)
    return status[1]


class _GrpcSender:
    def __init__(self, spec: LoadSpec) -> None:
        from modelxds.kserve import grpc_predict_v2_pb2 as pb

        self.spec = spec
        self.pb = pb
        self.calls: dict[str, Any] = {}
        self.channels: list[grpc.aio.Channel] = []
        self.bodies: dict[str, bytes] = {}

    def _call(self, address: str) -> Any:
        if address not in self.calls:
            channel = grpc.aio.insecure_channel(address.removeprefix("grpc://"))
            self.channels.append(channel)
            # raw bytes both ways: measure the network path, not protobuf in Python
            self.calls[address] = channel.unary_unary(MODEL_INFER)
        return self.calls[address]

    async def __call__(self, model: str) -> str:
        body = self.bodies.get(model)
        if body is None:
            msg = json_format.Parse(
                _fill(self.spec.payload.decode() or "{}", model), self.pb.ModelInferRequest()
            )
            body = self.bodies[model] = msg.SerializeToString()
        address = self.spec.target(model) if self.spec.target else self.spec.url
        metadata = tuple((k.lower(), _fill(v, model)) for k, v in self.spec.headers)
        try:
            await self._call(address)(body, metadata=metadata, timeout=60)
            return "OK"
        except grpc.aio.AioRpcError as e:
            return str(e.code().name)

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """fortio's flags, single dash as fortio spells them."""
    p.add_argument("url", help="http://host:port/path, or host:port with -grpc")
    p.add_argument("-qps", type=float, default=8.0, help="queries per second, 0 = max")
    p.add_argument("-c", type=int, default=4, dest="connections", help="connections")
    p.add_argument("-t", default="5s", dest="duration", help="duration, e.g. 60s, 1m, 1m30s")
    p.add_argument("-H", action="append", default=[], dest="headers", help="'name: value'")
    p.add_argument(
        "-payload", default="", help="request body (REST) or ModelInferRequest JSON (gRPC)"
    )
    p.add_argument("-payload-file", default="", dest="payload_file")
    p.add_argument("-content-type", default="", dest="content_type", help="the body's type")
    p.add_argument("-grpc", action="store_true", help="KServe V2 gRPC ModelInfer")
    p.add_argument("-jitter", action="store_true", help="+-10%% on request spacing")
    p.add_argument(
        "-json", default="", dest="json_out", help="write the result JSON here, - for stdout"
    )
    p.add_argument(
        "-a",
        action="store_true",
        dest="auto_save",
        help="save the result JSON as <data-dir>/YYYY-MM-DD-HHMMSS_<labels>.json (unless -json)",
    )
    p.add_argument(
        "-labels", default="", help="the result's Labels; default: the target and host name"
    )
    p.add_argument("-data-dir", default=".", dest="data_dir", help="where -a saves")
    p.add_argument(
        "-precise-pacing",
        action="store_true",
        dest="precise",
        help="-c 1: send within ~0.1 ms of each slot (blocks the loop for the last 2.5 ms)",
    )


BOOL_FLAGS = ("-grpc", "-jitter", "-a", "-precise-pacing")


def go_style(argv: Sequence[str]) -> list[str]:
    """Flags as Go's flag package takes them, which fortio's users paste: ``--name`` for
    ``-name``, and ``-name=true|false`` for a boolean."""
    out = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2 and arg != "--help":
            arg = arg[1:]
        name, sep, value = arg.partition("=")
        if sep and name in BOOL_FLAGS:
            if value in ("1", "t", "T", "true", "TRUE", "True"):
                out.append(name)
            elif value not in ("0", "f", "F", "false", "FALSE", "False"):
                raise SystemExit(f"error: {name} takes true or false, got {value!r}")
            continue
        out.append(arg)
    return out


def parse_duration(text: str) -> float:
    """fortio's -t: Go durations (``60s``, ``1m30s``, ``250ms``, ``1h``), or seconds."""
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return float(text)
    except ValueError:
        pass
    parts = re.findall(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h|d)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r} (e.g. 60s, 1m30s, 250ms)")
    return sum(float(n) * units[u] for n, u in parts)


def spec_from_args(args: argparse.Namespace) -> LoadSpec:
    payload = args.payload.encode()
    if args.payload_file:
        with open(args.payload_file, "rb") as f:
            payload = f.read()
    headers = []
    for h in args.headers:
        name, sep, value = h.partition(":")
        if not sep:
            raise SystemExit(f"error: -H expects 'name: value', got {h!r}")
        headers.append((name.strip(), value.strip()))
    if args.content_type:
        headers.append(("content-type", args.content_type))
    try:
        duration = parse_duration(args.duration)
    except ValueError as e:
        raise SystemExit(f"error: -t: {e}") from None
    return LoadSpec(
        url=args.url,
        qps=args.qps,
        connections=args.connections,
        duration=duration,
        headers=headers,
        payload=payload,
        grpc=args.grpc,
        jitter=args.jitter,
        precise=args.precise,
        labels=args.labels,
    )


def save(result: dict[str, Any], json_out: str, data_dir: str) -> str:
    """Write the result as fortio does: to -json's path, or with -a under its ID."""
    path = json_out or str(Path(data_dir) / f"{result['ID']}.json")
    text = json.dumps(result, indent=2) + "\n"
    if path == "-":
        sys.stdout.write(text)
        return "stdout"
    Path(path).write_text(text)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="modelxds bench load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # Go's flags have no abbreviations
    )
    add_arguments(p)
    args = p.parse_args(go_style(sys.argv[1:] if argv is None else argv))
    spec = spec_from_args(args)
    result = asyncio.run(run(spec))
    result.pop("Samples")
    # with the JSON on stdout the summary goes to stderr, where fortio prints its own
    out = sys.stderr if args.json_out == "-" else sys.stdout
    print(summary_line(result), file=out)
    if args.json_out or args.auto_save:
        try:
            where = save(result, args.json_out, args.data_dir)
        except OSError as e:
            print(f"error: cannot write the result: {e}", file=sys.stderr)
            return 1
        print(f"wrote {where}", file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
