"""The API models: valid manifests parse, bad ones are refused naming the field, CRDs match the models."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from dptrain_api import (
    DPTrainingJob,
    ManifestError,
    PrivateDataset,
    load_documents,
    parse_resource,
)
from dptrain_api.crdgen import RESOURCES, custom_resource_definition, reference_markdown, render
from tests.support.manifests import REPO, bad_cases, base_manifest, example_documents


def test_examples_exist_and_are_valid() -> None:
    documents = example_documents()
    assert len(documents) >= 3
    for name, document in documents:
        parse_resource(document, source=name)


@pytest.mark.parametrize("case", bad_cases(), ids=lambda case: case.name)
def test_bad_manifest_is_refused_naming_the_field(case: Any) -> None:
    with pytest.raises(ManifestError) as refused:
        parse_resource(case.document)
    assert case.field in str(refused.value)


def test_corpus_is_large_enough() -> None:
    assert len(bad_cases()) >= 15


def test_defaults_are_filled_from_one_place() -> None:
    job = parse_resource(base_manifest("job"))
    assert isinstance(job, DPTrainingJob)
    assert job.spec.privacy.accountant == "pld"
    assert job.spec.training.physical_batch_size == job.spec.training.batch_size == 64
    assert job.spec.checkpoint.every_steps == 50
    wire = job.to_wire()
    assert wire["spec"]["privacy"]["maxGradNorm"] == 1.0
    assert "noiseMultiplier" not in wire["spec"]["privacy"]


def test_dataset_requires_size_for_files() -> None:
    document = base_manifest("dataset")
    del document["spec"]["numExamples"]
    with pytest.raises(ManifestError, match="numExamples"):
        parse_resource(document)
    assert isinstance(parse_resource(base_manifest("dataset")), PrivateDataset)


def test_unknown_kind_and_bad_yaml_are_clear() -> None:
    with pytest.raises(ManifestError, match="kind must be one of"):
        parse_resource({"kind": "Deployment"})
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_documents("spec: [unclosed")
    with pytest.raises(ManifestError, match="no documents"):
        load_documents("---\n")


def test_cpu_accepts_floats_and_quantities() -> None:
    document = base_manifest("job")
    document["spec"]["resources"] = {"cpu": 0.5, "memory": "512Mi"}
    job = parse_resource(document)
    assert isinstance(job, DPTrainingJob)
    assert job.spec.resources.cpu == "0.5"


@pytest.mark.parametrize("resource", RESOURCES, ids=lambda resource: resource.kind)
def test_committed_crds_match_the_models(resource: Any) -> None:
    """Drift check: `make crds` regenerates crds/ from api/."""
    committed = (REPO / "crds" / resource.file_name).read_text()
    assert committed == render(resource), "crds/ is stale: run `make crds`"


def _walk(schema: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any]]]:
    found = [(path, schema)]
    for name, sub in schema.get("properties", {}).items():
        found += _walk(sub, f"{path}.{name}")
    if "items" in schema:  # list items need no description of their own; their fields do
        found += _walk(schema["items"], f"{path}[]")[1:]
    return found


@pytest.mark.parametrize("resource", RESOURCES, ids=lambda resource: resource.kind)
def test_crd_schema_is_structural_and_documented(resource: Any) -> None:
    crd = custom_resource_definition(resource)
    root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    text = yaml.safe_dump(crd)
    for forbidden in ("$ref", "anyOf", "$defs", "title:", "additionalProperties: false"):
        assert forbidden not in text
    for path, node in _walk(root["properties"]["spec"], "spec"):
        assert node.get("description"), f"{path} has no description (kubectl explain would be empty)"
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"


def test_printer_columns_show_what_users_need() -> None:
    job_crd = custom_resource_definition(RESOURCES[0])
    columns = [column["name"] for column in job_crd["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert columns[:4] == ["Phase", "Epsilon", "Target", "Progress"]
    assert job_crd["spec"]["names"]["shortNames"] == ["dptj"]
    assert job_crd["spec"]["names"]["categories"] == ["dptrain"]
    dataset_crd = custom_resource_definition(RESOURCES[1])
    assert dataset_crd["spec"]["names"]["shortNames"] == ["pds"]


def _leaf_paths(node: dict[str, Any], path: str) -> list[str]:
    items = node.get("items", {}) if node.get("type") == "array" else {}
    children = node.get("properties") or items.get("properties") or {}
    suffix = "[]" if items.get("properties") else ""
    return [path] + [leaf for name, child in children.items() for leaf in _leaf_paths(child, f"{path}{suffix}.{name}")]


@pytest.mark.parametrize("resource", RESOURCES, ids=lambda resource: resource.kind)
def test_reference_page_names_every_field_and_rule_of_the_crd(resource: Any) -> None:
    """The docs' reference is generated from the same schema as the CRD: every field and every CEL message appears."""
    page = reference_markdown(resource)
    schema = custom_resource_definition(resource)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for part in ("spec", "status"):
        for path in _leaf_paths(schema["properties"][part], part)[1:]:
            assert f"| `{path}` |" in page, path
    messages = [rule["message"] for rule in _rules(schema)]
    assert all(message.replace("|", "\\|") in page for message in messages)


def _rules(node: Any) -> list[dict[str, str]]:
    if isinstance(node, dict):
        own = node.get("x-kubernetes-validations", [])
        return [*own, *(rule for child in node.values() for rule in _rules(child))]
    if isinstance(node, list):
        return [rule for child in node for rule in _rules(child)]
    return []
