"""`modelxds` command line. Every flag can also be set by an environment variable."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc
import yaml

from modelxds import logs
from modelxds.health import DEFAULT_READY_ETCD_GRACE_S
from modelxds.labeler.labels import DEFAULT_MAX_MODEL_LABELS
from modelxds.modelmesh import DEFAULT_ROOT_PREFIX, DEFAULT_SERVICE_NAME, Layout
from modelxds.placement.etcd import EtcdConfigError, EtcdConnection
from modelxds.placement.model import DEFAULT_LOADED_AFTER_MS, Placement
from modelxds.policy.model import REST_PORT_ANNOTATION
from modelxds.xds.ir import RestMode
from modelxds.xds.resources import PUSH_ORDER, SHORT_NAMES
from modelxds.xds.server import MAX_NAMES, MAX_STREAMS

if TYPE_CHECKING:
    from modelxds.placement.watch import PlacementWatcher
    from modelxds.xds.bootstrap import XdsTls

DEFAULT_NAMESPACE = "modelmesh-serving"
DEFAULT_ETCD = "http://127.0.0.1:2379"
DEFAULT_XDS = "0.0.0.0:18000"
DEFAULT_BOOTSTRAP_XDS = "127.0.0.1:18000"


def _env(flag: str) -> str:
    return "MODELXDS_" + flag.lstrip("-").upper().replace("-", "_")


def _port(text: str) -> int:
    if text.isascii() and text.isdigit() and 1 <= int(text) <= 65535:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {text!r}")


def _add(p: argparse.ArgumentParser, flag: str, help: str, **kw: Any) -> None:
    """A flag whose default comes from MODELXDS_<FLAG> when set."""
    env = _env(flag)
    if env in os.environ:
        raw = os.environ[env]
        if kw.get("action") == "append":
            kw["default"] = [v.strip() for v in raw.split(",") if v.strip()]
        elif kw.get("action") in ("store_true", argparse.BooleanOptionalAction):
            kw["default"] = raw.lower() in ("1", "true", "yes")
        else:
            try:
                kw["default"] = kw.get("type", str)(raw)
            except (ValueError, argparse.ArgumentTypeError) as e:
                raise SystemExit(f"error: {env}: {e}") from None
    default = kw.get("default")
    shown = f" (default: {default})" if default not in (None, False, []) else ""
    p.add_argument(flag, help=f"{help}{shown} [env {env}]", **kw)


def _etcd_flags(p: argparse.ArgumentParser) -> None:
    # no argparse default: an explicit --etcd must be told apart from the default
    shown = "" if _env("--etcd") in os.environ else f" (default: {DEFAULT_ETCD})"
    _add(
        p,
        "--etcd",
        "etcd endpoint URL(s), comma-separated; http:// is plaintext, https:// is TLS with "
        f"the system's CAs{shown}",
    )
    _add(
        p,
        "--etcd-connection",
        "etcd connection JSON file, as ModelMesh Serving keeps in its model-serving-etcd "
        "secret (key etcd_connection): endpoints, userid/password, root_prefix, "
        "certificate[_file], client_key[_file], client_certificate[_file], "
        "override_authority; file names are relative to its folder. Not with --etcd",
    )
    _add(
        p,
        "--root-prefix",
        "ModelMesh root prefix; repeat (or comma-separate in env) to watch several namespaces; "
        "'<RP>/mm_ns/<ns>' is namespace <ns> (default: the connection file's root_prefix, "
        f"else {DEFAULT_ROOT_PREFIX})",
        action="append",
    )
    _add(p, "--namespace", "namespace of a root prefix without /mm_ns/", default=DEFAULT_NAMESPACE)
    _add(p, "--service-name", "ModelMesh service name", default=DEFAULT_SERVICE_NAME)
    _add(
        p,
        "--loaded-after-ms",
        "a copy counts as loaded this long after its load started",
        type=int,
        default=DEFAULT_LOADED_AFTER_MS,
    )


def etcd_connection(args: argparse.Namespace) -> EtcdConnection:
    """How to reach etcd, from ``--etcd`` or ``--etcd-connection``; exits 2 on bad input.

    Also sets ``args.etcd`` to the endpoints, for messages that name etcd.
    """
    cached = vars(args).get("_etcd_connection")
    if isinstance(cached, EtcdConnection):
        return cached
    try:
        if args.etcd_connection and args.etcd:
            raise EtcdConfigError(
                "give --etcd or --etcd-connection (MODELXDS_ETCD or MODELXDS_ETCD_CONNECTION), "
                "not both"
            )
        if args.etcd_connection:
            connection = EtcdConnection.from_file(args.etcd_connection)
        else:
            connection = EtcdConnection.from_url(args.etcd or DEFAULT_ETCD)
    except EtcdConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    args._etcd_connection = connection
    args.etcd = connection.display
    return connection


def _layouts(args: argparse.Namespace) -> list[tuple[str, Layout]]:
    prefixes = args.root_prefix or [etcd_connection(args).root_prefix or DEFAULT_ROOT_PREFIX]
    out = []
    for rp in prefixes:
        layout = Layout(rp, args.service_name)
        out.append((layout.namespace(args.namespace), layout))
    names = [ns for ns, _ in out]
    if len(set(names)) != len(names):
        raise SystemExit(f"error: two root prefixes map to the same namespace: {names}")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelxds",
        description="xDS control plane that routes each inference request to a ModelMesh "
        "pod holding its model.",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("MODELXDS_LOG_LEVEL", "INFO"),
        help="DEBUG, INFO, WARNING, ERROR [env MODELXDS_LOG_LEVEL]",
    )
    _add(
        parser,
        "--log-format",
        "'text' lines for people, or 'json': one object a line with time, level, logger, "
        "message and the line's fields",
        choices=logs.FORMATS,
        default="text",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="watch etcd and serve xDS to Envoy gateways")
    _etcd_flags(serve)
    _add(
        serve,
        "--policy",
        "DestinationRule/VirtualService YAML file or directory (default: the built-in "
        "seed policy: subset key modelmesh.asm.alibabacloud.com, header 'model', port 8008; "
        "none with --kubernetes)",
    )
    _add(
        serve,
        "--allow-empty-policy",
        "serve a policy that routes no port, which removes every gateway listener",
        action="store_true",
        default=False,
    )
    _add(
        serve,
        "--policy-poll-ms",
        "how often --policy files are checked for changes, which are then loaded as on "
        "SIGHUP (0: only on SIGHUP)",
        type=int,
        default=2000,
    )
    _add(
        serve,
        "--kubernetes",
        "read the DestinationRule / VirtualService objects of modelxds.io (manifests/crds) "
        "from Kubernetes, follow their changes and report on each in its status; with "
        "--policy, files and objects together",
        action="store_true",
        default=False,
    )
    _add(
        serve,
        "--kubeconfig",
        "kubeconfig for --kubernetes (default: the pod's service account in a cluster, else "
        "$KUBECONFIG or ~/.kube/config)",
    )
    _add(
        serve,
        "--watch-namespace",
        "namespace whose objects --kubernetes reads; repeat (or comma-separate in env) for "
        "several (default: the namespaces of the root prefixes)",
        action="append",
    )
    _add(
        serve,
        "--strategy",
        "gateway config: 'subset' (one cluster, Envoy subset LB on endpoint metadata, as ASM) "
        "or 'scale' (a cluster per pod, O(1) route matcher per model in scoped route "
        "tables: for 10,000s of models)",
        choices=["subset", "scale"],
        default="subset",
    )
    _add(
        serve,
        "--rest",
        "KServe V2 REST: 'proxy' sends it to the holder's REST proxy (ModelMesh Serving's "
        "rest-proxy, both JSON forms); 'transcode' turns it into gRPC at the gateway, for "
        "meshes without the REST proxy (protobuf JSON 'contents' form only)",
        choices=[m.value for m in RestMode],
        default=RestMode.PROXY.value,
    )
    _add(
        serve,
        "--rest-port",
        "the pods' REST proxy port, unless a VirtualService's "
        f"{REST_PORT_ANNOTATION} annotation names another",
        type=_port,
        default=8008,
    )
    _add(serve, "--xds-address", "ADS gRPC listen address HOST:PORT", default=DEFAULT_XDS)
    _add(
        serve,
        "--xds-tls-cert",
        "serve xDS (and CSDS, gRPC health on the same port) over TLS with this certificate: "
        "PEM file, intermediates after it; with --xds-tls-key",
    )
    _add(serve, "--xds-tls-key", "the private key of --xds-tls-cert: PEM file, unencrypted")
    _add(
        serve,
        "--xds-client-ca",
        "mutual TLS: clients must present a certificate signed by a CA of this PEM file, and "
        "a gateway's node id must be one of its certificate's identities (DNS SAN, URI SAN, "
        "the last segment of a spiffe:// URI, or the CN of a certificate without SANs); "
        "with --xds-tls-cert",
    )
    _add(
        serve,
        "--max-gateways",
        "ADS streams served at once; more are refused with RESOURCE_EXHAUSTED",
        type=int,
        default=MAX_STREAMS,
    )
    _add(
        serve,
        "--max-names",
        "resource names one ADS request may subscribe to",
        type=int,
        default=MAX_NAMES,
    )
    _health_flags(serve, "127.0.0.1:9091")
    _add(serve, "--listen-address", "address gateway listeners bind to", default="0.0.0.0")
    _add(
        serve,
        "--debounce-quiet-ms",
        "a change after this long without a push goes out at once; one sooner waits for this "
        "long without change",
        type=int,
        default=100,
    )
    _add(
        serve,
        "--debounce-max-ms",
        "push at the latest this long after a change",
        type=int,
        default=1000,
    )
    _add(
        serve,
        "--update-merge-window-ms",
        "Envoy cluster update_merge_window for endpoint metadata updates",
        type=int,
        default=50,
    )

    _label_parser(sub)
    _epp_parser(sub)

    boot = sub.add_parser("bootstrap", help="print an Envoy bootstrap (YAML) for a gateway")
    _add(
        boot,
        "--xds",
        "modelxds ADS address HOST:PORT; repeat for replicas (default 127.0.0.1:18000)",
        action="append",
    )
    _add(boot, "--node-id", "the gateway's node id (shown in modelxds logs)", default="gateway")
    _add(boot, "--admin-address", "Envoy admin HOST:PORT", default="127.0.0.1:15000")
    _add(boot, "--cluster", "the gateway's node cluster", default="modelxds-gateway")
    _xds_tls_flags(boot, "the gateway reaches modelxds")
    _epp_bootstrap_flags(boot)

    status = sub.add_parser(
        "status",
        help="per gateway and type: config sent, accepted (ACK) or rejected (NACK), and for "
        "how long the gateway has been behind",
    )
    _add(status, "--xds", "modelxds ADS address HOST:PORT", default="127.0.0.1:18000")
    _xds_tls_flags(status, "status reaches modelxds")
    _add(status, "--json", "machine-readable output", action="store_true", default=False)
    _inspect_parser(sub)

    mesh = sub.add_parser("mesh", help="the local ModelMesh-compatible mesh: InferenceServices")
    mesh_sub = mesh.add_subparsers(dest="mesh_command", required=True)
    apply = mesh_sub.add_parser(
        "apply", help="register InferenceServices (serving.kserve.io, ModelMesh mode)"
    )
    apply.add_argument(
        "-f",
        "--filename",
        action="append",
        required=True,
        help="YAML file or directory; repeatable",
    )
    _etcd_flags(apply)
    mstatus = mesh_sub.add_parser("status", help="InferenceServices: active/target model, state")
    _etcd_flags(mstatus)
    _add(mstatus, "--json", "machine-readable output", action="store_true", default=False)

    bench = sub.add_parser(
        "bench",
        help="load generator and benchmarks: `bench load --help`, `bench compare --help`, "
        "`bench report --help`",
    )
    bench.add_argument("tool", choices=["load", "compare", "report"])
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="the tool's own flags")

    show = sub.add_parser("placement", help="print the placement modelxds sees in etcd")
    _etcd_flags(show)
    _add(
        show,
        "--model",
        "only this model id or InferenceService name: its copies and the pods it routes to "
        "(exit 1 if etcd has no such name)",
    )
    _add(show, "--json", "machine-readable output", action="store_true", default=False)
    return parser


def _xds_tls_flags(p: argparse.ArgumentParser, who: str) -> None:
    """How a client of ours reaches an xDS server that serves TLS (serve --xds-tls-cert)."""
    _add(p, "--tls-ca", f"{who} over TLS, trusting the CA certificates of this PEM file")
    _add(
        p,
        "--tls-cert",
        "client certificate PEM file, for a server that asks for one (serve --xds-client-ca); "
        "with --tls-key and --tls-ca",
    )
    _add(p, "--tls-key", "the private key of --tls-cert: PEM file, unencrypted")
    _add(
        p,
        "--tls-server-name",
        "the name the server's certificate must carry (DNS or IP SAN), also sent as SNI; "
        "with --tls-ca (default: the gateway checks only the CA; status checks the --xds host)",
    )


def _health_flags(p: argparse.ArgumentParser, metrics_address: str) -> None:
    _add(
        p,
        "--metrics-address",
        "HTTP HOST:PORT of Prometheus /metrics and the probes /healthz (live) and /readyz "
        "(ready); loopback by default, 0.0.0.0:PORT for Prometheus or kubelet probes from "
        "elsewhere (empty: off)",
        default=metrics_address,
    )
    _add(
        p,
        "--ready-etcd-grace-s",
        "/readyz and the gRPC readiness service answer not ready once etcd has been "
        "unreachable for longer than this",
        type=float,
        default=DEFAULT_READY_ETCD_GRACE_S,
    )


def _inspect_parser(sub: Any) -> None:
    inspect = sub.add_parser(
        "inspect",
        help="where a gateway's Envoy sends each model (its admin API); with --etcd or "
        "--etcd-connection, the drift from the live placement (exit 1 on drift)",
    )
    _add(inspect, "--admin", "the gateway's Envoy admin URL", default="http://127.0.0.1:15000")
    _add(inspect, "--model", "only this model id or InferenceService name")
    _add(inspect, "--json", "machine-readable output", action="store_true", default=False)
    _etcd_flags(inspect)
    _add(
        inspect,
        "--policy",
        "the DestinationRule/VirtualService YAML serve uses, which says which listener port "
        "serves which namespace (default: the built-in seed policy)",
    )


def _label_parser(sub: Any) -> None:
    label = sub.add_parser(
        "label",
        help="keep ModelMesh pods' labels in sync with the models routable on them",
    )
    _etcd_flags(label)
    _add(
        label,
        "--policy",
        "DestinationRule/VirtualService YAML file or directory, as for serve: its subset key "
        "prefixes the labels (default: the built-in seed policy, modelmesh.asm.alibabacloud.com)",
    )
    _add(label, "--kubeconfig", "kubeconfig file (default: in-cluster config, else ~/.kube/config)")
    _add(
        label,
        "--max-model-labels",
        "model labels per pod at most; beyond them <key>/overflow=true and <key>/model-count "
        "(the <key>/models annotation always lists every name)",
        type=int,
        default=DEFAULT_MAX_MODEL_LABELS,
    )
    _add(
        label,
        "--patch-interval-ms",
        "patch each pod at most once in this long; changes meanwhile go out together",
        type=int,
        default=1000,
    )
    _add(
        label,
        "--leader-elect",
        "patch only while holding the Lease, so that replicas never fight",
        action=argparse.BooleanOptionalAction,
        default=True,
    )
    _add(label, "--lease-name", "the Lease for leader election", default="modelxds-labeler")
    _add(
        label,
        "--lease-namespace",
        "namespace of the Lease (default: env POD_NAMESPACE, else the first watched namespace)",
    )
    _health_flags(label, "127.0.0.1:9092")


def _epp_parser(sub: Any) -> None:
    from modelxds.epp.server import DEFAULT_EPP_ADDRESS, DEFAULT_TARGET_PORT

    epp = sub.add_parser(
        "epp",
        help="endpoint picker (Envoy ext_proc) for Gateway API Inference Extension gateways: "
        "each request to a pod that holds its model",
    )
    _etcd_flags(epp)
    _add(
        epp,
        "--policy",
        "DestinationRule/VirtualService YAML file or directory, as for serve: the fallback "
        "and the model headers (default: the built-in seed policy)",
    )
    _add(
        epp, "--epp-address", "ext_proc gRPC listen address HOST:PORT", default=DEFAULT_EPP_ADDRESS
    )
    _add(
        epp,
        "--target-port",
        "the pool's target port on the pods (InferencePool targetPorts)",
        type=_port,
        default=DEFAULT_TARGET_PORT,
    )
    _add(epp, "--plaintext", "serve without TLS", action="store_true", default=False)
    _add(epp, "--cert-file", "TLS certificate PEM (default: a self-signed one made at start)")
    _add(epp, "--key-file", "TLS private key PEM, with --cert-file")
    _health_flags(epp, "127.0.0.1:9090")


def _epp_bootstrap_flags(boot: argparse.ArgumentParser) -> None:
    from modelxds.xds.bootstrap import APP_PROTOCOLS, FAILURE_MODES

    _add(
        boot,
        "--epp",
        "print instead the bootstrap of a gateway in front of an endpoint picker at HOST:PORT "
        "(modelxds epp), as GIE gateways are built: ext_proc filter, override_host pool",
    )
    _add(
        boot, "--epp-plaintext", "reach the picker without TLS", action="store_true", default=False
    )
    _add(
        boot,
        "--epp-failure-mode",
        "when the picker fails: FailOpen lets the pool's round robin pick, FailClose answers 5xx",
        choices=FAILURE_MODES,
        default="FailClose",
    )
    _add(
        boot,
        "--pool-endpoint",
        "a pod of the pool, IP:PORT, repeatable; or NAME:PORT of a headless Service (STRICT_DNS)",
        action="append",
    )
    _add(
        boot,
        "--app-protocol",
        "the pool's protocol (InferencePool appProtocol): kubernetes.io/h2c (gRPC) or http",
        choices=APP_PROTOCOLS,
        default=APP_PROTOCOLS[0],
    )
    _add(boot, "--listen-address", "address the gateway's listener binds", default="0.0.0.0")
    _add(boot, "--listen-port", "the gateway's listener port", type=_port, default=8008)


def _xds_tls(args: argparse.Namespace) -> XdsTls | None:
    """The bootstrap's TLS to modelxds from --tls-*, None without them; ValueError when
    they do not go together."""
    from modelxds.xds.bootstrap import XdsTls

    given = [args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name]
    if not any(given):
        return None
    if not args.tls_ca:
        raise ValueError("--tls-cert, --tls-key and --tls-server-name need --tls-ca")
    tls = XdsTls(args.tls_ca, args.tls_cert or None, args.tls_key or None, args.tls_server_name)
    if not tls.server_name:
        print(
            "warning: without --tls-server-name the gateway checks only that the server's "
            "certificate chains to --tls-ca, not whose it is",
            file=sys.stderr,
        )
    return tls


def _epp_bootstrap(args: argparse.Namespace) -> dict[str, Any]:
    from modelxds.xds.bootstrap import epp_bootstrap

    if any([args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name]):
        raise ValueError(
            "--tls-* secure the connection to modelxds serve; a gateway in front of a "
            "picker (--epp) has none (--epp-plaintext says how it reaches the picker)"
        )

    return epp_bootstrap(
        args.epp,
        args.pool_endpoint or [],
        admin_address=args.admin_address,
        listen_address=args.listen_address,
        listen_port=args.listen_port,
        node_id=args.node_id,
        cluster=args.cluster,
        epp_plaintext=args.epp_plaintext,
        failure_mode=args.epp_failure_mode,
        app_protocol=args.app_protocol,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    if args.command == "bootstrap":
        from modelxds.xds.bootstrap import bootstrap

        try:
            doc = (
                _epp_bootstrap(args)
                if args.epp
                else bootstrap(
                    args.xds or DEFAULT_BOOTSTRAP_XDS,
                    args.node_id,
                    args.admin_address,
                    cluster=args.cluster,
                    tls=_xds_tls(args),
                )
            )
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        sys.stdout.write(yaml.safe_dump(doc, sort_keys=False))
        return 0
    if args.command == "placement":
        return asyncio.run(_placement(args))
    if args.command == "status":
        return _status(args)
    if args.command == "inspect":
        return asyncio.run(_inspect(args))
    if args.command == "mesh":
        return asyncio.run(_mesh(args))
    if args.command == "bench":
        if args.tool == "load":
            from modelxds.bench.load import main as load_main

            return load_main(args.rest)
        if args.tool == "report":
            from modelxds.bench.report import main as report_main

            return report_main(args.rest)
        from modelxds.bench.compare import main as compare_main

        return compare_main(args.rest)
    if args.command == "epp":
        from modelxds.epp.server import epp

        return asyncio.run(epp(args, _layouts(args)))
    if args.command == "label":
        from modelxds.labeler.run import label

        return asyncio.run(label(args, _layouts(args)))
    from modelxds.serve import serve

    return asyncio.run(serve(args, _layouts(args)))


def _why(e: BaseException, args: argparse.Namespace) -> str:
    """An etcd failure in one line: the settings to check, never a secret."""
    from modelxds.placement.etcd import describe

    if isinstance(e, grpc.aio.AioRpcError):
        return describe(e, etcd_connection(args))
    if isinstance(e, TimeoutError):
        return "no answer within 30 s"
    return str(e)


async def _read_etcd(args: argparse.Namespace) -> PlacementWatcher | None:
    """A watcher that has read etcd once; None (the reason printed) if it could not."""
    from modelxds.placement.watch import PlacementWatcher

    watcher = PlacementWatcher(
        etcd_connection(args), _layouts(args), loaded_after_ms=args.loaded_after_ms
    )
    try:
        await asyncio.wait_for(watcher.list_once(), 30)
    except Exception as e:
        print(f"error: cannot read etcd at {args.etcd}: {_why(e, args)}", file=sys.stderr)
        return None
    return watcher


async def _placement(args: argparse.Namespace) -> int:
    watcher = await _read_etcd(args)
    if watcher is None:
        return 1
    if args.model:
        from modelxds.inspect import format_holders, holders_report

        holders = holders_report(watcher.snapshot(), args.model)
        if not holders:
            print(f"no model or InferenceService {args.model!r} in etcd", file=sys.stderr)
            return 1
        print(json.dumps(holders, indent=2) if args.json else format_holders(args.model, holders))
        return 0
    report = placement_report(
        watcher.snapshot(), watcher.invalid_records(), watcher.ignored_fields()
    )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 0


async def _inspect(args: argparse.Namespace) -> int:
    from modelxds import inspect
    from modelxds.policy import PolicyError, default_policy, load_policy

    try:
        policy = load_policy(args.policy) if args.policy else default_policy()
        strategy, routes = await asyncio.to_thread(inspect.read_gateway, args.admin)
    except (PolicyError, inspect.AdminError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    drift = None
    if args.etcd or args.etcd_connection:
        watcher = await _read_etcd(args)
        if watcher is None:
            return 2
        drift = inspect.find_drift(routes, watcher.snapshot(), policy, args.model)
    doc = inspect.report(strategy, routes, args.model, drift)
    print(json.dumps(doc, indent=2) if args.json else inspect.format_report(args.admin, doc))
    return 1 if drift else 0


async def _mesh(args: argparse.Namespace) -> int:
    from modelxds.localmesh import isvc
    from modelxds.modelmesh.registrar import etcd_client
    from modelxds.placement.watch import PlacementWatcher

    layouts = _layouts(args)
    if len(layouts) != 1:
        print("error: give one --root-prefix for mesh commands", file=sys.stderr)
        return 2
    (_, layout) = layouts[0]
    if args.mesh_command == "apply":
        try:
            services = isvc.read_files(args.filename)
        except isvc.InferenceServiceError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        connection = etcd_connection(args)
        endpoint = connection.endpoints[0]
        if len(connection.endpoints) != 1 or endpoint.tls or connection.userid:
            print(
                "error: mesh apply writes to the local mesh's own etcd, one plaintext "
                "endpoint without authentication: give --etcd http://HOST:PORT",
                file=sys.stderr,
            )
            return 2
        client = etcd_client(endpoint.url)
        try:
            await client.connect()
            for service in services:
                print(await isvc.apply(client, layout, service))
        finally:
            await client.close()
        return 0
    watcher = PlacementWatcher(etcd_connection(args), layouts, loaded_after_ms=args.loaded_after_ms)
    try:
        await asyncio.wait_for(watcher.list_once(), 30)
    except Exception as e:
        print(f"error: cannot read etcd at {args.etcd}: {_why(e, args)}", file=sys.stderr)
        return 1
    (ns, _) = layouts[0]
    rows = isvc.status_rows(watcher.tables[0].vmodels, watcher.snapshot().meshes[ns])
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(f"InferenceService {r['name']}: {r['state']}, ready={r['ready']}")
        print(
            f"  active model  {r['active_model'] or '-'}  on {', '.join(r['active_copies']) or '-'}"
        )
        if r["target_model"] != r["active_model"]:
            print(f"  target model  {r['target_model']}  on {', '.join(r['target_copies']) or '-'}")
    if not rows:
        print("no InferenceServices")
    return 0


def _status(args: argparse.Namespace) -> int:
    import grpc
    from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc

    try:
        channel = _xds_channel(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with channel:
        try:
            resp = csds_pb2_grpc.ClientStatusDiscoveryServiceStub(channel).FetchClientStatus(
                csds_pb2.ClientStatusRequest(), timeout=10
            )
        except grpc.RpcError as e:
            # a TLS server closes a plaintext connection without a word gRPC could show
            hint = (
                "" if args.tls_ca else " (if it serves TLS, give --tls-ca, --tls-cert, --tls-key)"
            )
            print(
                f"error: cannot reach modelxds at {args.xds}: {e.details()}{hint}", file=sys.stderr
            )
            return 1
    rows = status_rows(resp)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("no gateways connected")
    else:
        width = max(len(r["gateway"]) for r in rows)
        types = "  ".join(f"{t:<24}" for t in _TYPES.values())
        print(f"{'GATEWAY':<{width}}  {'BEHIND':<8}  {types}".rstrip())
        for r in rows:
            cells = "  ".join(f"{r[t]:<24}" for t in _TYPES.values())
            behind = "-" if r["behind_seconds"] is None else f"{r['behind_seconds']:.1f}s"
            print(f"{r['gateway']:<{width}}  {behind:<8}  {cells}".rstrip())
            for error in r["errors"]:
                print(f"{'':<{width}}  {error}")
    return 0


def _xds_channel(args: argparse.Namespace) -> grpc.Channel:
    """A channel to ``--xds``: plaintext, or TLS (mutual with a client certificate) when
    --tls-ca is given; ValueError (flags and files named) when the flags cannot serve."""
    from modelxds.xds.tls import channel_credentials

    # CSDS lists every resource name of every gateway: 100 gateways under the scale
    # strategy answer 11 MB, past gRPC's default 4 MB limit
    options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", -1)]
    if not args.tls_ca:
        if args.tls_cert or args.tls_key or args.tls_server_name:
            raise ValueError("--tls-cert, --tls-key and --tls-server-name need --tls-ca")
        return grpc.insecure_channel(args.xds, options=options)
    credentials = channel_credentials(args.tls_ca, args.tls_cert, args.tls_key)
    if args.tls_server_name:
        # gRPC checks the certificate against the target's host unless told another name
        options.append(("grpc.ssl_target_name_override", args.tls_server_name))
    return grpc.secure_channel(args.xds, credentials, options=options)


# every type the server sends, scoped routes included, by the name operators use
_TYPES = {t: SHORT_NAMES[t].upper() for t in PUSH_ORDER}


def status_rows(resp: Any, now: float | None = None) -> list[dict[str, Any]]:
    """One row per gateway: the worst status per type (NACKED > STALE > NOT SENT > SYNCED),
    and for how long (seconds, by the clock ``now``) it has been behind."""
    from envoy.service.status.v3 import csds_pb2

    now = time.time() if now is None else now
    rank = {"ERROR": 0, "STALE": 1, "NOT_SENT": 2, "SYNCED": 3, "UNKNOWN": 4}
    rows = []
    for config in resp.config:
        worst: dict[str, tuple[int, str]] = {}
        errors = []
        # the server stamps an entry the gateway is behind on with when it fell behind
        since = [
            x.last_updated.ToNanoseconds() / 1e9
            for x in config.generic_xds_configs
            if x.HasField("last_updated")
        ]
        for x in config.generic_xds_configs:
            kind = _TYPES.get(x.type_url, x.type_url)
            status = csds_pb2.ConfigStatus.Name(x.config_status)
            label = "NACKED" if status == "ERROR" else status.replace("_", " ")
            cell = f"{label} {x.version_info[:8]}".strip()
            if kind not in worst or rank[status] < worst[kind][0]:
                worst[kind] = (rank[status], cell)
            if status == "ERROR" and x.error_state.details:
                errors.append(f"{kind} {x.name}: {x.error_state.details}")
        row: dict[str, Any] = {"gateway": config.node.id or "(unnamed)"}
        row.update({kind: worst.get(kind, (0, "NOT REQUESTED"))[1] for kind in _TYPES.values()})
        row["behind_seconds"] = round(max(0.0, now - min(since)), 3) if since else None
        row["errors"] = sorted(set(errors))
        rows.append(row)
    return rows


def placement_report(
    placement: Placement, invalid: dict[str, str], ignored: dict[str, str]
) -> dict[str, Any]:
    """What ``modelxds placement`` prints: ``invalid`` records were skipped whole; the
    records in ``ignored`` were kept with the named fields read as their defaults."""
    meshes = {}
    for ns, mesh in placement.meshes.items():
        meshes[ns] = {
            "instances": {
                i.id: {"address": i.host, "zone": i.zone, "models": i.model_count}
                for i in mesh.instances.values()
            },
            "models": {
                mid: {k: list(getattr(c, k)) for k in ("loaded", "loading", "failed", "dead")}
                for mid, c in sorted(mesh.models.items())
            },
            "vmodels": {
                vid: {
                    "active": v.active,
                    "target": v.target,
                    "state": v.transition.value,
                    "routable": list(mesh.routable(vid)),
                }
                for vid, v in sorted(mesh.vmodels.items())
            },
        }
    return {
        "revision": placement.revision,
        "namespaces": meshes,
        "invalid_records": invalid,
        "ignored_fields": ignored,
    }


def format_report(report: dict[str, Any]) -> str:
    lines = [f"etcd revision {report['revision']}"]
    for ns, mesh in report["namespaces"].items():
        lines.append(
            f"\nnamespace {ns}: {len(mesh['instances'])} instances, "
            f"{len(mesh['models'])} models, {len(mesh['vmodels'])} vmodels"
        )
        for iid, inst in sorted(mesh["instances"].items()):
            lines.append(f"  instance {iid}  {inst['address']}  zone={inst['zone'] or '-'}")
        for mid, c in mesh["models"].items():
            parts = [f"{k}={','.join(v)}" for k, v in c.items() if v]
            lines.append(f"  model {mid}  {'  '.join(parts) or 'not loaded'}")
        for vid, v in mesh["vmodels"].items():
            lines.append(f"  vmodel {vid} -> {v['active']} ({v['state']}, target {v['target']})")
    for key, why in report["invalid_records"].items():
        lines.append(f"skipped malformed record {key}: {why}")
    for key, why in report["ignored_fields"].items():
        lines.append(f"kept record {key}, ignoring {why}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
