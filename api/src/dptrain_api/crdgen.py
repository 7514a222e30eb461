"""Generate the CustomResourceDefinitions in `crds/` from the pydantic models.

Pydantic emits JSON Schema 2020-12; Kubernetes wants a *structural* OpenAPI v3.0 schema: no $refs,
no `anyOf` of types, boolean exclusive bounds, no `additionalProperties: false`. `structural_schema`
converts one into the other; `custom_resource_definitions` adds names, printer columns and the
status subresource.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from dptrain_api.common import API_GROUP, API_VERSION
from dptrain_api.dataset import PrivateDataset, PrivateDatasetSpec, PrivateDatasetStatus
from dptrain_api.federation import (
    DPFederatedJob,
    DPFederatedJobSpec,
    DPFederatedJobStatus,
    DPFederatedSite,
    DPFederatedSiteSpec,
    DPFederatedSiteStatus,
)
from dptrain_api.job import DPTrainingJob, DPTrainingJobSpec, DPTrainingJobStatus
from dptrain_api.ledger import PrivacyLedger, PrivacyLedgerSpec, PrivacyLedgerStatus

_DROPPED_KEYS = {"title", "examples", "$defs"}
_RULES = "x-kubernetes-validations"


@dataclass(frozen=True)
class PrinterColumn:
    name: str
    json_path: str
    type: str
    description: str
    priority: int = 0

    def to_wire(self) -> dict[str, Any]:
        column: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "jsonPath": self.json_path,
            "description": self.description,
        }
        if self.priority:
            column["priority"] = self.priority
        return column


@dataclass(frozen=True)
class ResourceDefinition:
    """What Kubernetes needs to serve one kind, besides its schema."""

    model: type[BaseModel]
    spec_model: type[BaseModel]
    status_model: type[BaseModel]
    plural: str
    short_names: tuple[str, ...]
    printer_columns: tuple[PrinterColumn, ...]
    categories: tuple[str, ...] = ("dptrain",)
    extra_required: tuple[str, ...] = field(default=())
    scope: str = "Namespaced"

    @property
    def kind(self) -> str:
        return str(self.model.model_fields["kind"].default)

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{API_GROUP}"

    @property
    def file_name(self) -> str:
        return f"{API_GROUP}_{self.plural}.yaml"


_AGE = PrinterColumn("Age", ".metadata.creationTimestamp", "date", "Time since creation")

RESOURCES: tuple[ResourceDefinition, ...] = (
    ResourceDefinition(
        model=DPTrainingJob,
        spec_model=DPTrainingJobSpec,
        status_model=DPTrainingJobStatus,
        plural="dptrainingjobs",
        short_names=("dptj",),
        printer_columns=(
            PrinterColumn("Phase", ".status.phase", "string", "Pending, Running, Succeeded, Failed or Suspended"),
            PrinterColumn("Epsilon", ".status.privacy.epsilonSpent", "number", "Privacy spent so far (ε)"),
            PrinterColumn("Target", ".spec.privacy.targetEpsilon", "number", "Privacy budget of the job (ε)"),
            PrinterColumn("Progress", ".status.progress.percent", "string", "Training steps done"),
            PrinterColumn("Loss", ".status.progress.loss", "number", "Latest training loss", priority=1),
            PrinterColumn("Dataset", ".spec.dataset.datasetRef.name", "string", "PrivateDataset charged", priority=1),
            _AGE,
        ),
    ),
    ResourceDefinition(
        model=PrivateDataset,
        spec_model=PrivateDatasetSpec,
        status_model=PrivateDatasetStatus,
        plural="privatedatasets",
        short_names=("pds",),
        printer_columns=(
            PrinterColumn("Unit", ".status.privacyUnit", "string", "Whose privacy is protected: a record or a column"),
            PrinterColumn("Budget", ".spec.budget.epsilon", "number", "Total privacy budget (ε)"),
            PrinterColumn("Spent", ".status.epsilonSpent", "number", "ε committed by finished jobs"),
            PrinterColumn("Reserved", ".status.epsilonReserved", "number", "ε held by running jobs"),
            PrinterColumn("Remaining", ".status.epsilonRemaining", "number", "ε still available"),
            _AGE,
        ),
    ),
    ResourceDefinition(
        model=PrivacyLedger,
        spec_model=PrivacyLedgerSpec,
        status_model=PrivacyLedgerStatus,
        plural="privacyledgers",
        short_names=("pled",),
        scope="Cluster",
        categories=(),  # cluster-scoped: `kubectl get dptrain -n <ns>` would list every dataset's ledger
        printer_columns=(
            PrinterColumn("Identity", ".spec.identity", "string", "The dataset identity the ledger keeps"),
            PrinterColumn("Dataset", ".status.dataset.name", "string", "The PrivateDataset describing it now"),
            PrinterColumn("Budget", ".status.budget.epsilon", "number", "Budget in force (ε)"),
            PrinterColumn("Spent", ".status.epsilonSpent", "number", "ε committed by finished jobs"),
            PrinterColumn("Reserved", ".status.epsilonReserved", "number", "ε held by running jobs"),
            PrinterColumn("Remaining", ".status.epsilonRemaining", "number", "ε still available"),
            _AGE,
        ),
    ),
    ResourceDefinition(
        model=DPFederatedJob,
        spec_model=DPFederatedJobSpec,
        status_model=DPFederatedJobStatus,
        plural="dpfederatedjobs",
        short_names=("dpfj",),
        printer_columns=(
            PrinterColumn("Phase", ".status.phase", "string", "Pending, Running, Succeeded or Failed"),
            PrinterColumn("Rounds", ".status.rounds.completed", "integer", "Rounds aggregated so far"),
            PrinterColumn("Total", ".spec.training.rounds", "integer", "Rounds of the federation"),
            PrinterColumn("Target", ".spec.privacy.targetEpsilon", "number", "Each site's privacy budget (ε)"),
            PrinterColumn("Metric", ".status.globalMetric.value", "number", "Global model's DP held-out metric"),
            PrinterColumn("SuperLink", ".status.superlinkAddress", "string", "Address the sites dial", priority=1),
            _AGE,
        ),
    ),
    ResourceDefinition(
        model=DPFederatedSite,
        spec_model=DPFederatedSiteSpec,
        status_model=DPFederatedSiteStatus,
        plural="dpfederatedsites",
        short_names=("dpfs",),
        printer_columns=(
            PrinterColumn("Phase", ".status.phase", "string", "Pending, Running, Succeeded or Failed"),
            PrinterColumn("Federation", ".spec.federation.name", "string", "The coordinator's DPFederatedJob"),
            PrinterColumn("Epsilon", ".status.privacy.epsilonSpent", "number", "ε this site's journal charged"),
            PrinterColumn("Target", ".spec.privacy.targetEpsilon", "number", "This site's privacy budget (ε)"),
            PrinterColumn("Rounds", ".status.rounds", "integer", "Rounds this site trained"),
            PrinterColumn("Dataset", ".spec.datasetRef.name", "string", "PrivateDataset charged", priority=1),
            _AGE,
        ),
    ),
)


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema as a Kubernetes structural schema (every $ref inlined)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    converted: dict[str, Any] = _convert(raw, raw.get("$defs", {}))
    return converted


def _convert(node: Any, definitions: dict[str, Any]) -> Any:  # noqa: C901, PLR0912 - one branch per JSON-schema construct pydantic emits
    if isinstance(node, list):
        return [_convert(item, definitions) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = definitions[node.pop("$ref").rsplit("/", 1)[-1]]
        # Sibling keys (description, default) override the referenced definition's own; rules add up.
        rules = target.get(_RULES, []) + node.get(_RULES, [])
        node = {**target, **node}
        if rules:
            node[_RULES] = rules
    if "allOf" in node and len(node["allOf"]) == 1:
        node = {**node.pop("allOf")[0], **node}
        return _convert(node, definitions)
    if "anyOf" in node:
        node = _collapse_any_of(node, definitions)
    result: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED_KEYS:
            continue
        if key == "additionalProperties":
            if value is True:
                result["x-kubernetes-preserve-unknown-fields"] = True
            elif isinstance(value, dict):
                result[key] = _convert(value, definitions)
            continue  # `false` (extra="forbid"): the server prunes; strict field validation refuses.
        if key == "const":
            result["enum"] = [value]
            continue
        if key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            result["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            result[key] = True
            continue
        if key == "default":
            if value is not None:
                # An object default is `{}`: the nested defaults fill it in, so each is stated once.
                result[key] = {} if isinstance(value, dict) else value
            continue
        if key == "properties":
            result[key] = {name: _convert(sub, definitions) for name, sub in value.items()}
            continue
        result[key] = _convert(value, definitions)
    if result.get("type") == "object" and "properties" not in result and "additionalProperties" not in result:
        result["x-kubernetes-preserve-unknown-fields"] = True
    if "enum" in result and "type" not in result:
        result["type"] = _json_type(result["enum"][0])
    return result


def _collapse_any_of(node: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    options = node.pop("anyOf")
    non_null = [option for option in options if option.get("type") != "null"]
    nullable = len(non_null) < len(options)
    types = sorted(option.get("type", "") for option in non_null)
    if len(non_null) == 1:
        merged = {**_convert(non_null[0], definitions), **node}
        if nullable:
            merged["nullable"] = True
        return merged
    if types == ["integer", "string"]:
        merged = {**node, "x-kubernetes-int-or-string": True}
        if nullable:
            merged["nullable"] = True
        return merged
    raise ValueError(f"cannot express anyOf {options} in a structural schema")


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return "string"


def custom_resource_definition(resource: ResourceDefinition) -> dict[str, Any]:
    spec_schema = structural_schema(resource.spec_model)
    status_schema = structural_schema(resource.status_model)
    model_doc = (resource.model.__doc__ or "").strip()
    kind = resource.kind
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": resource.crd_name,
            "labels": {"app.kubernetes.io/part-of": "dptrain"},
        },
        "spec": {
            "group": API_GROUP,
            "scope": resource.scope,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": resource.plural,
                "singular": kind.lower(),
                "shortNames": list(resource.short_names),
                "categories": list(resource.categories),
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [column.to_wire() for column in resource.printer_columns],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": model_doc,
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string", "description": "dptrain.io/v1alpha1"},
                                "kind": {"type": "string", "description": kind},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


HEADER = "# Generated by `dptrain-crdgen` from api/src/dptrain_api. Do not edit: change the models and regenerate.\n"
CHART_CRDS = Path("charts/dptrain/templates/crds")
_CHART_LABELS_SENTINEL = "dptrain.io/chart-labels-go-here"


def render(resource: ResourceDefinition) -> str:
    body = yaml.safe_dump(custom_resource_definition(resource), sort_keys=False, allow_unicode=True, width=120)
    return HEADER + body


def render_chart_template(resource: ResourceDefinition) -> str:
    """The CRD as a Helm template: behind `crds.enabled`, kept on uninstall, with the release's labels.

    Template delimiters in the schema (a description, say) are escaped so Helm prints them verbatim.
    """
    crd = custom_resource_definition(resource)
    metadata = crd["metadata"]
    metadata["labels"] = {_CHART_LABELS_SENTINEL: "", **metadata["labels"]}
    metadata["annotations"] = {"helm.sh/resource-policy": "keep"}
    body = yaml.safe_dump(crd, sort_keys=False, allow_unicode=True, width=120).replace("{{", "{{`{{`}}")
    body = body.replace(f"    {_CHART_LABELS_SENTINEL}: ''\n", '    {{- include "dptrain.crdLabels" . | nindent 4 }}\n')
    return (
        "{{- /* Generated by `dptrain-crdgen --chart` from api/src/dptrain_api: do not edit, run `make crds`. */}}\n"
        "{{- if .Values.crds.enabled }}\n" + body + "{{- end }}\n"
    )


REFERENCE = Path("docs/src/reference")


def _constraints(node: dict[str, Any]) -> str:
    """The schema's bounds, enum and CEL rules of one field, as text."""
    parts = []
    for key, word in (("minimum", "≥"), ("maximum", "≤"), ("minLength", "length ≥"), ("maxLength", "length ≤"),
                      ("minItems", "items ≥"), ("maxItems", "items ≤")):  # fmt: skip
        if key in node:
            exclusive = node.get(f"exclusive{key[:1].upper()}{key[1:]}")
            parts.append(f"{word.replace('≥', '>').replace('≤', '<') if exclusive else word} {node[key]}")
    if "enum" in node:
        parts.append("one of " + ", ".join(f"`{value}`" for value in node["enum"]))
    if "pattern" in node:
        parts.append(f"pattern `{node['pattern']}`")
    items = node.get("items", {}) if node.get("type") == "array" else {}
    parts += [rule["message"] for rule in [*node.get(_RULES, []), *items.get(_RULES, [])]]
    return "; ".join(parts).replace("|", "\\|")


def _type_of(node: dict[str, Any]) -> str:
    kind = node.get("type", "object" if "properties" in node else "any")
    if kind == "array":
        return f"array of {_type_of(node.get('items', {}))}"
    if node.get("x-kubernetes-int-or-string"):
        return "integer or string"
    return str(kind)


def _rows(node: dict[str, Any], path: str, required: bool) -> list[str]:
    description = " ".join((node.get("description") or "").split()).replace("|", "\\|")
    default = f"`{node['default']}`" if "default" in node else ("required" if required else "")
    rows = [f"| `{path}` | {_type_of(node)} | {default} | {description} | {_constraints(node)} |"]
    items = node.get("items", {}) if node.get("type") == "array" else {}
    children = node.get("properties") or items.get("properties") or {}
    needed = set(node.get("required") or items.get("required") or [])
    suffix = "[]" if items.get("properties") else ""
    for name, child in children.items():
        rows += _rows(child, f"{path}{suffix}.{name}", name in needed)
    return rows


def reference_markdown(resource: ResourceDefinition) -> str:
    """The resource's fields (spec and status) as a Markdown reference page, from the same schema as its CRD."""
    schema = custom_resource_definition(resource)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    head = "| field | type | default | description | rules |\n|---|---|---|---|---|"
    sections = [
        f"# {resource.kind}\n",
        "<!-- Generated by `dptrain-crdgen --reference` from api/src/dptrain_api: do not edit, run `make crds`. -->\n",
        f"`{API_GROUP}/{API_VERSION}`, plural `{resource.plural}`"
        + (f", short names {', '.join(f'`{name}`' for name in resource.short_names)}" if resource.short_names else "")
        + f", {resource.scope.lower()}.\n",
        " ".join((resource.model.__doc__ or "").split()) + "\n",
    ]
    for part in ("spec", "status"):
        node = schema["properties"][part]
        sections += [f"## {part}\n", head, *_rows(node, part, part == "spec")[1:], ""]
        across = [rule["message"] for rule in [*schema.get(_RULES, []), *node.get(_RULES, [])] if part == "spec"]
        if across:
            sections += ["Rules across fields (checked by the API server):\n", *(f"- {rule}" for rule in across), ""]
    return "\n".join(sections)


def _sync(files: dict[Path, str], *, check: bool) -> list[str]:
    """Write ``files`` (or, with ``check``, list those that differ on disk)."""
    stale = []
    for path, text in files.items():
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the dptrain CRDs generated from the API models.")
    parser.add_argument("--out", type=Path, default=Path("crds"), help="output folder (default: crds)")
    parser.add_argument(
        "--chart", type=Path, nargs="?", const=CHART_CRDS, help=f"also the Helm templates (default: {CHART_CRDS})"
    )
    parser.add_argument(
        "--reference",
        type=Path,
        nargs="?",
        const=REFERENCE,
        help=f"also the docs' reference pages (default: {REFERENCE})",
    )
    parser.add_argument("--check", action="store_true", help="fail if the files on disk differ (drift check)")
    args = parser.parse_args(argv)
    files = {args.out / resource.file_name: render(resource) for resource in RESOURCES}
    if args.chart is not None:
        files |= {args.chart / resource.file_name: render_chart_template(resource) for resource in RESOURCES}
    if args.reference is not None:
        files |= {args.reference / f"{resource.plural}.md": reference_markdown(resource) for resource in RESOURCES}
    stale = _sync(files, check=args.check)
    if stale:
        print(f"out of date (run `make crds`): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
