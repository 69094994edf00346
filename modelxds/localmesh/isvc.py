"""KServe InferenceServices (ModelMesh deployment mode) -> ModelMesh registry and vmodels.

What the modelmesh-serving controller does for `kubectl apply -f isvc.yaml`: register
a concrete model ``<name>__isvc-<hash of the predictor spec>`` and point the
InferenceService's vmodel at it. A changed spec gives a new model id, which becomes the
vmodel's target while the old one stays active until the new one is loaded.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aetcd
import yaml

from modelxds.modelmesh import Layout, ModelRecord, Table, VModelRecord, encode, parse_vmodel
from modelxds.modelmesh.registrar import update_model
from modelxds.placement.model import MeshPlacement

DEPLOYMENT_MODE = "serving.kserve.io/deploymentMode"
API_VERSIONS = ("serving.kserve.io/v1beta1", "serving.kserve.io/v1alpha1")
# What the API server takes as an object's name (RFC 1123 subdomain). The name is the
# vmodel's etcd key: a "/" in it would put the record where no watcher reads it.
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_SURROGATE = re.compile("[\ud800-\udfff]")


class InferenceServiceError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class InferenceService:
    name: str
    namespace: str
    model_format: str
    storage_key: str
    storage_path: str
    spec_hash: str

    @property
    def model_id(self) -> str:
        return f"{self.name}__isvc-{self.spec_hash}"

    def record(self) -> ModelRecord:
        # encKey carries the storage location as the controller's model key does
        key = {"storage_key": self.storage_key, "model_type": {"name": self.model_format}}
        return ModelRecord(
            type=f"mt:{self.model_format}",
            model_path=self.storage_path,
            encryption_key=json.dumps(key, sort_keys=True),
            auto_delete=True,
        )


def parse_isvcs(text: str, source: str, *, required: bool = True) -> list[InferenceService]:
    """InferenceService documents in ``text``; other kinds are skipped. None at all is an
    error unless not ``required``."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d]
    except (yaml.YAMLError, ValueError, RecursionError) as e:
        # PyYAML lets ValueError out of its constructors (2024-13-45 as a date) and
        # RecursionError out of deep nesting
        why = "nested too deeply" if isinstance(e, RecursionError) else e
        raise InferenceServiceError(f"{source}: invalid YAML: {why}") from None
    out, errors = [], []
    for i, doc in enumerate(docs, start=1):
        if not isinstance(doc, dict) or doc.get("kind") != "InferenceService":
            continue
        where = f"{source} document {i}"
        try:
            out.append(_isvc(doc, where))
        except InferenceServiceError as e:
            errors.append(str(e))
    if errors:
        raise InferenceServiceError("\n".join(errors))
    if not out and required:
        raise InferenceServiceError(f"{source}: no InferenceService documents")
    return out


def _isvc(doc: dict[str, Any], where: str) -> InferenceService:
    def field(path: str) -> Any:
        node: Any = doc
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                raise InferenceServiceError(f"{where}: missing {path}")
            node = node[part]
        return node

    if doc.get("apiVersion") not in API_VERSIONS:
        raise InferenceServiceError(
            f"{where}: apiVersion {doc.get('apiVersion')!r} is not one of {', '.join(API_VERSIONS)}"
        )
    name = field("metadata.name")
    if not isinstance(name, str) or len(name) > 253 or not _NAME.fullmatch(name):
        raise InferenceServiceError(
            f"{where}: metadata.name {str(name)[:100]!r} is not a Kubernetes object name "
            "(lower case letters, digits, '-' and '.')"
        )
    namespace = doc["metadata"].get("namespace", "default")
    if not isinstance(namespace, str):
        raise InferenceServiceError(f"{where} ({name}): metadata.namespace must be a string")
    annotations = doc["metadata"].get("annotations") or {}
    if not isinstance(annotations, dict) or annotations.get(DEPLOYMENT_MODE) != "ModelMesh":
        raise InferenceServiceError(
            f"{where} ({name}): metadata.annotations.{DEPLOYMENT_MODE} must be ModelMesh"
        )
    predictor = field("spec.predictor")
    model_format = field("spec.predictor.model.modelFormat.name")
    if not isinstance(model_format, str) or not model_format:
        raise InferenceServiceError(
            f"{where} ({name}): spec.predictor.model.modelFormat.name must be a string"
        )
    storage = doc["spec"]["predictor"]["model"].get("storage") or {}
    if not isinstance(storage, dict) or not all(
        isinstance(storage.get(k), str) and storage[k] for k in ("key", "path")
    ):
        raise InferenceServiceError(
            f"{where} ({name}): spec.predictor.model.storage needs key and path (strings)"
        )
    # YAML escapes can write half of a surrogate pair ("\ud800"), which the record's
    # UTF-8 JSON cannot carry: ModelMesh and the watcher would not read it back
    for path, text in (
        ("metadata.namespace", namespace),
        ("spec.predictor.model.modelFormat.name", model_format),
        ("spec.predictor.model.storage.key", storage["key"]),
        ("spec.predictor.model.storage.path", storage["path"]),
    ):
        if _SURROGATE.search(text):
            raise InferenceServiceError(
                f"{where} ({name}): {path} {text[:100]!r} is not valid Unicode "
                "(a lone \\u surrogate escape)"
            )
    try:
        spec = json.dumps(predictor, sort_keys=True)
    except (TypeError, ValueError, RecursionError) as e:
        # what kubectl could not send either: a YAML date, binary or set, a cycle
        raise InferenceServiceError(
            f"{where} ({name}): spec.predictor is not JSON data (quote dates): {e}"
        ) from None
    return InferenceService(
        name=name,
        namespace=namespace,
        model_format=model_format.lower(),
        storage_key=storage["key"],
        storage_path=storage["path"],
        spec_hash=hashlib.sha256(spec.encode()).hexdigest()[:10],
    )


async def apply(client: aetcd.Client, layout: Layout, isvc: InferenceService) -> str:
    """Register the model and aim the vmodel at it; returns what happened, for the user."""
    record = isvc.record()
    await update_model(client, layout, isvc.model_id, lambda old: old or record)
    key = layout.key(Table.VMODELS, isvc.name).encode()
    got = await client.get(key)
    old = parse_vmodel(got.value) if got is not None else None
    if old is not None and old.target_model == isvc.model_id and not old.target_failed:
        return f"inferenceservice/{isvc.name} unchanged"
    if old is None:
        new = VModelRecord(owner="isvc", target_model=isvc.model_id)
        verb = "created"
    else:
        # the model serving now keeps serving until the new one is loaded
        new = VModelRecord(owner="isvc", active_model=old.active_model, target_model=isvc.model_id)
        verb = "configured"
    await client.put(key, encode(new))
    return f"inferenceservice/{isvc.name} {verb} (model {isvc.model_id})"


def status_rows(raw_vmodels: dict[str, VModelRecord], mesh: MeshPlacement) -> list[dict[str, Any]]:
    """`kubectl describe isvc`-like state of every InferenceService."""
    rows = []
    for name, rec in sorted(raw_vmodels.items()):
        if rec.active_model and rec.active_model == rec.target_model:
            state = "UpToDate"
        elif rec.target_failed:
            state = "BlockedByFailedLoad"
        else:
            state = "InProgress"
        active = mesh.models.get(rec.active_model)
        target = mesh.models.get(rec.target_model)
        rows.append(
            {
                "name": name,
                "active_model": rec.active_model or None,
                "target_model": rec.target_model or None,
                "state": state,
                "ready": bool(active and active.routable),
                "active_copies": list(active.loaded + active.loading) if active else [],
                "target_copies": list((target.loaded + target.loading) if target else ()),
            }
        )
    return rows


def read_files(paths: list[str]) -> list[InferenceService]:
    out = []
    for p in paths:
        path = Path(p)
        folder = path.is_dir()
        for f in sorted(path.glob("*.y*ml")) if folder else [path]:
            try:
                # a folder of manifests holds other files too (kustomization.yaml, rules)
                out.extend(parse_isvcs(f.read_text(), str(f), required=not folder))
            except OSError as e:
                raise InferenceServiceError(f"{f}: {e.strerror}") from None
    return out
