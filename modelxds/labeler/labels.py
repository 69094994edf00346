"""What each ModelMesh pod's labels should say, and the merge patch that gets them there.

Pure functions of placement and a pod's current metadata: no Kubernetes client here.
Every key written is under the policy's subset key (``<key>/``): one label per name
routable on the pod (``loaded`` or ``loading``) up to a cap, and one annotation
``<key>/models`` with every name. docs/labeler.md explains the choices.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from modelxds.modelmesh import instance_id_from_pod_name
from modelxds.placement.model import Copies, MeshPlacement
from modelxds.policy import Policy

LOADED = "loaded"
LOADING = "loading"
DEFAULT_MAX_MODEL_LABELS = 200
# label names of our own; a model with one of these names gets the hashed form
OVERFLOW_LABEL = "overflow"
COUNT_LABEL = "model-count"
_RESERVED = frozenset({OVERFLOW_LABEL, COUNT_LABEL})
MODELS_ANNOTATION = "models"
# Kubernetes refuses an object whose annotations (keys and values) exceed this in total.
ANNOTATIONS_LIMIT = 256 * 1024
# Ours takes at most half: the rest is left to everyone else's annotations.
MODELS_ANNOTATION_BUDGET = 128 * 1024

NAME_MAX = 63
PREFIX_MAX = 253
HASH_CHARS = 16  # 64 bits of sha256: distinct names clash with odds of 2^-64 a pair
_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_SUBDOMAIN = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")
# The shape of a hashed form. A name that already has it is hashed too, so a name
# written as is can never equal another name's hashed form.
_HASHED = re.compile(rf".*--[0-9a-f]{{{HASH_CHARS}}}")
_NOT_NAME_CHARS = re.compile(r"[^-A-Za-z0-9_.]+")
_EDGES = re.compile(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$")
_READABLE_MAX = NAME_MAX - 2 - HASH_CHARS


class LabelerConfigError(ValueError):
    """A setting the labeler cannot start with."""


def check_subset_key(key: str) -> str:
    """``key`` if it can prefix a label key (a DNS subdomain of at most 253 characters)."""
    if len(key) > PREFIX_MAX or not _SUBDOMAIN.fullmatch(key):
        raise LabelerConfigError(
            f"subset key {key!r} cannot prefix a Kubernetes label: a label prefix is a DNS "
            f"subdomain (lower-case letters, digits, '-' and '.', at most {PREFIX_MAX} "
            "characters, starting and ending with a letter or digit)"
        )
    return key


def subset_key(policy: Policy, namespace: str, service: str) -> str:
    """The label prefix for the pods of ``service`` in ``namespace``: the first subset key
    of the DestinationRule for that Service, else the policy's only subset key."""
    rule = policy.destination_rule_for(service, namespace)
    keys = rule.subset_keys if rule is not None else ()
    if not keys:
        every = tuple(dict.fromkeys(k for r in policy.destination_rules for k in r.subset_keys))
        if len(every) != 1:
            raise LabelerConfigError(
                f"no DestinationRule with a dynamicSubset key for Service {service} in "
                f"namespace {namespace}, and the policy has {len(every)} subset keys "
                f"({', '.join(every) or 'none'}): which one labels the pods is unclear"
            )
        keys = every
    return check_subset_key(keys[0])


def is_label_name(text: str) -> bool:
    """Kubernetes accepts ``text`` as the name part of a label key."""
    return len(text) <= NAME_MAX and _NAME.fullmatch(text) is not None


def label_name(name: str) -> str:
    """The label name part for a model or InferenceService name.

    A valid name part is used as is. Any other name, and a valid one that looks like a
    hashed form or is one of our own labels, becomes ``<readable>--<hash>``: the name
    with each run of other characters turned into ``-``, cut to 45 characters and
    trimmed to start and end alphanumeric (``x`` if nothing is left), then ``--`` and
    the first 16 hex digits of the SHA-256 of the name's UTF-8 bytes.
    """
    if is_label_name(name) and not _HASHED.fullmatch(name) and name not in _RESERVED:
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_CHARS]
    readable = _EDGES.sub("", _NOT_NAME_CHARS.sub("-", name)[:_READABLE_MAX])
    return f"{readable or 'x'}--{digest}"


@dataclass(frozen=True, slots=True)
class PodModels:
    """The names routable on one pod, by the state of the pod's copy, each sorted."""

    loaded: tuple[str, ...] = ()
    loading: tuple[str, ...] = ()

    def ordered(self) -> list[tuple[str, str]]:
        """(name, state): loaded before loading, then by name; the order the cap keeps."""
        return [(n, LOADED) for n in self.loaded] + [(n, LOADING) for n in self.loading]

    def __len__(self) -> int:
        return len(self.loaded) + len(self.loading)


@dataclass(frozen=True, slots=True)
class Desired:
    """Our keys on one pod. ``models`` None: the pod is no live instance, so none at all."""

    labels: Mapping[str, str] = field(default_factory=dict)
    models: PodModels | None = None


NOTHING = Desired()


def pod_models(mesh: MeshPlacement, instance_id: str) -> PodModels:
    """The names routable on ``instance_id``, as ``MeshPlacement.names`` lists them."""
    loaded, loading = [], []
    for name in mesh.names.get(instance_id, ()):
        copies = _copies(mesh, name)
        if copies is not None and instance_id in copies.loading:
            loading.append(name)
        else:
            loaded.append(name)
    return PodModels(tuple(loaded), tuple(loading))


def _copies(mesh: MeshPlacement, name: str) -> Copies | None:
    copies = mesh.models.get(name)
    if copies is None:
        vmodel = mesh.vmodels.get(name)
        copies = mesh.models.get(vmodel.active) if vmodel is not None else None
    return copies


def model_labels(key: str, models: PodModels, cap: int) -> dict[str, str]:
    """One label per name up to ``cap``; beyond it, ``overflow`` and ``model-count``."""
    ordered = models.ordered()
    labels = {f"{key}/{label_name(name)}": state for name, state in ordered[: max(cap, 0)]}
    if len(ordered) > cap:
        labels[f"{key}/{OVERFLOW_LABEL}"] = "true"
        labels[f"{key}/{COUNT_LABEL}"] = str(len(ordered))
    return labels


def desired_for_mesh(mesh: MeshPlacement, key: str, cap: int) -> dict[str, Desired]:
    """Instance id -> our keys on its pod, for every live instance of the mesh."""
    out = {}
    for iid in mesh.instances:
        models = pod_models(mesh, iid)
        out[iid] = Desired(model_labels(key, models, cap), models)
    return out


def models_annotation(models: PodModels, budget: int) -> str | None:
    """Compact JSON ``{"loaded": [...], "loading": [...]}`` of at most ``budget``
    characters. When every name does not fit, the names that fit (in the cap's order)
    and ``"truncated": <names left out>``; None if not even that fits."""
    ordered = models.ordered()
    full = _render(ordered, 0)
    if len(full) <= budget:
        return full
    # Room for the braces, both keys, the largest possible "truncated" count and commas.
    room = budget - len(_render([], len(ordered)))
    kept = 0
    for name, _ in ordered:
        cost = len(json.dumps(name)) + 1
        if cost > room:
            break
        room -= cost
        kept += 1
    while kept >= 0:
        text = _render(ordered[:kept], len(ordered) - kept)
        if len(text) <= budget:
            return text
        kept -= 1
    return None


def _render(ordered: list[tuple[str, str]], truncated: int) -> str:
    doc: dict[str, Any] = {
        LOADED: [n for n, s in ordered if s == LOADED],
        LOADING: [n for n, s in ordered if s == LOADING],
    }
    if truncated:
        doc["truncated"] = truncated
    return json.dumps(doc, separators=(",", ":"), sort_keys=True)


def merge_patch(
    key: str,
    labels: Mapping[str, str],
    annotations: Mapping[str, str],
    desired: Desired,
) -> dict[str, Any] | None:
    """The JSON merge patch that takes a pod's ``labels`` and ``annotations`` to
    ``desired``, touching only labels under ``<key>/`` and the ``<key>/models``
    annotation (null removes a key); None when the pod already matches."""
    prefix = f"{key}/"
    label_changes: dict[str, str | None] = {
        k: None for k in labels if k.startswith(prefix) and k not in desired.labels
    }
    label_changes.update({k: v for k, v in desired.labels.items() if labels.get(k) != v})
    annotation = f"{key}/{MODELS_ANNOTATION}"
    value = None
    if desired.models is not None:
        others = sum(len(k) + len(v) for k, v in annotations.items() if k != annotation)
        budget = min(MODELS_ANNOTATION_BUDGET, ANNOTATIONS_LIMIT - others) - len(annotation)
        value = models_annotation(desired.models, budget)
    metadata: dict[str, Any] = {}
    if label_changes:
        metadata["labels"] = label_changes
    if annotations.get(annotation) != value:
        metadata["annotations"] = {annotation: value}
    return {"metadata": metadata} if metadata else None


def same_address(a: str, b: str) -> bool:
    """Two spellings of one IP address (IPv6 has many), or the same text."""
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b


def instance_of(mesh: MeshPlacement, pod_name: str, pod_ip: str) -> str | None:
    """The live instance running as this pod: its litelinks instance id is the last 12
    characters of the pod name, and it registered the pod's IP. A pod that restarted
    under the same name with a new IP is not the instance etcd still lists."""
    iid = instance_id_from_pod_name(pod_name)
    instance = mesh.instances.get(iid)
    if instance is None or not pod_ip or not same_address(instance.host, pod_ip):
        return None
    return iid
