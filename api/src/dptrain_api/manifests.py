"""Reading manifests (YAML or JSON) into validated resources, with errors that name the field."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from dptrain_api.dataset import PrivateDataset
from dptrain_api.errors import ManifestError
from dptrain_api.federation import DPFederatedJob, DPFederatedSite
from dptrain_api.job import DPTrainingJob

Resource = DPTrainingJob | PrivateDataset
_KINDS: dict[str, type[DPTrainingJob] | type[PrivateDataset]] = {
    "DPTrainingJob": DPTrainingJob,
    "PrivateDataset": PrivateDataset,
}


def describe_validation_error(error: ValidationError, *, prefix: str = "") -> list[str]:
    """One `field.path: message` line per problem, in the camelCase names users write."""
    lines = []
    for problem in error.errors():
        path = ".".join(str(part) for part in problem["loc"] if not str(part).startswith("function-after"))
        path = f"{prefix}.{path}" if prefix and path else (prefix or path)
        message = problem["msg"].removeprefix("Value error, ")
        lines.append(f"{path}: {message}" if path else message)
    return lines


def parse_resource(document: Mapping[str, Any], *, source: str = "manifest") -> Resource:
    """Validate one object; raise ManifestError naming each offending field."""
    kind = document.get("kind")
    model = _KINDS.get(str(kind))
    if model is None:
        raise ManifestError(f"{source}: kind must be one of {sorted(_KINDS)}, got {kind!r}")
    try:
        return model.model_validate(dict(document))
    except ValidationError as error:
        raise ManifestError(f"{source}: invalid {kind}", problems=describe_validation_error(error)) from None


FederationResource = DPFederatedJob | DPFederatedSite | PrivateDataset
_FEDERATION_KINDS: dict[str, type[DPFederatedJob] | type[DPFederatedSite] | type[PrivateDataset]] = {
    "DPFederatedJob": DPFederatedJob,
    "DPFederatedSite": DPFederatedSite,
    "PrivateDataset": PrivateDataset,
}


def parse_federation_resource(document: Mapping[str, Any], *, source: str = "manifest") -> FederationResource:
    """Validate one object of a federation manifest (DPFederatedJob, DPFederatedSite or PrivateDataset)."""
    kind = document.get("kind")
    model = _FEDERATION_KINDS.get(str(kind))
    if model is None:
        raise ManifestError(f"{source}: kind must be one of {sorted(_FEDERATION_KINDS)}, got {kind!r}")
    try:
        return model.model_validate(dict(document))
    except ValidationError as error:
        raise ManifestError(f"{source}: invalid {kind}", problems=describe_validation_error(error)) from None


def load_documents(text: str, *, source: str = "manifest") -> list[dict[str, Any]]:
    """Parse JSON or (multi-document) YAML into plain objects."""
    try:
        if text.lstrip().startswith("{"):
            documents: Iterable[Any] = [json.loads(text)]
        else:
            documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        raise ManifestError(f"{source}: not valid YAML or JSON: {error}") from None
    result = []
    for document in documents:
        if not isinstance(document, dict):
            raise ManifestError(f"{source}: every document must be a mapping, got {type(document).__name__}")
        result.append(document)
    if not result:
        raise ManifestError(f"{source}: no documents found")
    return result


def load_manifest_file(path: str | Path) -> list[Resource]:
    """Every dptrain resource in a YAML/JSON file, validated."""
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as error:
        raise ManifestError(f"cannot read {file}: {error.strerror}") from None
    return [parse_resource(doc, source=f"{file}[{i}]") for i, doc in enumerate(load_documents(text, source=str(file)))]


def load_federation_manifest_file(path: str | Path) -> list[FederationResource]:
    """Every resource of a federation manifest file (a DPFederatedJob and its sites' PrivateDatasets), validated."""
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as error:
        raise ManifestError(f"cannot read {file}: {error.strerror}") from None
    return [
        parse_federation_resource(doc, source=f"{file}[{i}]")
        for i, doc in enumerate(load_documents(text, source=str(file)))
    ]
