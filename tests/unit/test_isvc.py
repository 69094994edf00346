"""InferenceService documents as `modelxds mesh apply` reads them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelxds.localmesh.isvc import InferenceServiceError, parse_isvcs, read_files

EXAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "examples"


def test_the_seed_inference_service_parses() -> None:
    (svc,) = read_files([str(EXAMPLES / "example-mnist-isvc.yaml")])
    assert (svc.name, svc.namespace, svc.model_format) == (
        "example-mnist-isvc",
        "modelmesh-serving",
        "sklearn",
    )
    assert (svc.storage_key, svc.storage_path) == ("localMinIO", "sklearn/mnist-svm.joblib")
    assert svc.model_id.startswith("example-mnist-isvc__isvc-")
    record = svc.record()
    assert record.type == "mt:sklearn" and record.model_path == "sklearn/mnist-svm.joblib"
    assert json.loads(record.encryption_key)["storage_key"] == "localMinIO"


def test_model_id_follows_the_predictor_spec() -> None:
    text = (EXAMPLES / "example-mnist-isvc.yaml").read_text()
    (a,) = parse_isvcs(text, "a")
    (b,) = parse_isvcs(text, "b")
    (c,) = parse_isvcs(text.replace("mnist-svm.joblib", "mnist-svm-v2.joblib"), "c")
    assert a.model_id == b.model_id  # applying again changes nothing
    assert c.model_id != a.model_id  # a changed model is a new model id


def test_directory_with_other_kinds() -> None:
    services = read_files([str(EXAMPLES)])
    assert sorted(s.name for s in services) == ["example-digits-lgb", "example-mnist-isvc"]
    text = (
        "apiVersion: v1\nkind: Service\nmetadata: {name: x}\n---\n"
        + (EXAMPLES / "example-mnist-isvc.yaml").read_text()
    )
    assert [s.name for s in parse_isvcs(text, "mixed")] == ["example-mnist-isvc"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("    serving.kserve.io/deploymentMode: ModelMesh\n", ""), "deploymentMode must be"),
        (("        key: localMinIO\n", ""), "storage needs key and path"),
        (("serving.kserve.io/v1beta1", "serving.kserve.io/v9"), "apiVersion"),
        (("      modelFormat:\n        name: sklearn\n", ""), "modelFormat.name"),
    ],
)
def test_errors_name_the_document_and_field(change: tuple[str, str], message: str) -> None:
    text = (EXAMPLES / "example-mnist-isvc.yaml").read_text()
    assert change[0] in text
    with pytest.raises(InferenceServiceError, match=message) as err:
        parse_isvcs(text.replace(*change), "isvc.yaml")
    assert "isvc.yaml document 1" in str(err.value)


def test_a_file_without_inference_services_is_an_error() -> None:
    with pytest.raises(InferenceServiceError, match="no InferenceService"):
        parse_isvcs("kind: Service\n", "svc.yaml")
