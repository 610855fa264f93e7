"""The wire shapes pinned: JSON names, omitted empty fields, createdAt format, null handling."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from faas_provider.models import FunctionDeployment, FunctionStatus, Secret


def test_deployment_accepts_nulls_unknown_fields_and_an_empty_namespace() -> None:
    deployment = FunctionDeployment.model_validate(
        {
            "service": "echo",
            "image": "x",
            "namespace": "",
            "labels": None,
            "annotations": None,
            "envVars": None,
            "secrets": None,
            "somethingNew": {"ignored": True},
            "limits": {"memory": "128Mi", "nvidia.com/gpu": "1"},
        }
    )
    assert deployment.namespace == "openfaas-fn"
    assert deployment.labels == {} and deployment.secrets == []
    assert deployment.limits is not None and deployment.limits.gpu == "1"


def test_status_always_has_labels_and_annotations_and_leaves_out_other_empty_fields() -> None:
    status = FunctionStatus(
        name="echo",
        image="x",
        namespace="openfaas-fn",
        labels={},
        replicas=1,
        availableReplicas=0,
        createdAt=datetime(2026, 1, 2, 3, 4, 5, 600000, tzinfo=UTC),
    )
    wire = status.to_wire()
    assert wire == {
        "name": "echo",
        "image": "x",
        "namespace": "openfaas-fn",
        "replicas": 1,
        "availableReplicas": 0,
        "invocationCount": 0.0,
        "readOnlyRootFilesystem": False,
        "createdAt": "2026-01-02T03:04:05.600000Z",
        "labels": {},
        "annotations": {},
    }


def test_secret_raw_value_is_base64_and_wins() -> None:
    secret = Secret.model_validate({"name": "a", "value": "plain", "rawValue": "AAEC"})
    assert secret.payload() == b"\x00\x01\x02"
    assert Secret.model_validate({"name": "a", "value": "plain"}).payload() == b"plain"
    with pytest.raises(ValidationError):
        Secret.model_validate({"name": "a", "rawValue": "not base64!"})
