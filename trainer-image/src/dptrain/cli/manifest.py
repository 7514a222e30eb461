"""Loading a DPTrainingJob manifest (and the PrivateDataset it names) from a file, stdin or an env var."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dptrain.errors import ConfigurationError
from dptrain_api import (
    DPTrainingJob,
    ManifestError,
    PrivateDataset,
    load_documents,
    load_manifest_file,
    parse_resource,
)

if TYPE_CHECKING:
    pass


@dataclass
class LoadedManifest:
    job: DPTrainingJob
    dataset: PrivateDataset | None
    base_dir: Path
    source: str


def _select(resources: Sequence[DPTrainingJob | PrivateDataset], *, source: str, base_dir: Path) -> LoadedManifest:
    jobs = [r for r in resources if isinstance(r, DPTrainingJob)]
    if len(jobs) != 1:
        raise ManifestError(f"{source}: expected exactly one DPTrainingJob, found {len(jobs)}")
    job = jobs[0]
    dataset: PrivateDataset | None = None
    reference = job.spec.dataset.dataset_ref
    if reference is not None:
        matches = [r for r in resources if isinstance(r, PrivateDataset) and r.metadata.name == reference.name]
        if not matches:
            names = [r.metadata.name for r in resources if isinstance(r, PrivateDataset)]
            raise ConfigurationError(
                f"{source}: dataset.datasetRef names PrivateDataset {reference.name!r}, but the manifest holds "
                f"{'PrivateDatasets ' + repr(names) if names else 'no PrivateDataset'}; add it to the manifest"
            )
        dataset = matches[0]
    return LoadedManifest(job=job, dataset=dataset, base_dir=base_dir, source=source)


def _parse_text(text: str, *, source: str) -> list[DPTrainingJob | PrivateDataset]:
    return [parse_resource(doc, source=f"{source}[{i}]") for i, doc in enumerate(load_documents(text, source=source))]


def load_job_manifest(
    manifest: str | None, *, from_env: str | None = None, data_dir: Path | None = None
) -> LoadedManifest:
    """The DPTrainingJob (and the PrivateDataset it names) from a file, ``-`` (stdin) or an env var."""
    if from_env is not None:
        text = os.environ.get(from_env)
        if text is None or not text.strip():
            raise ConfigurationError(f"--from-env {from_env}: the environment variable is not set or empty")
        source = f"${from_env}"
        loaded = _select(_parse_text(text, source=source), source=source, base_dir=Path.cwd())
    elif manifest is None:
        raise ConfigurationError("give a MANIFEST file, - for stdin, or --from-env VAR")
    elif manifest == "-":
        loaded = _select(_parse_text(sys.stdin.read(), source="<stdin>"), source="<stdin>", base_dir=Path.cwd())
    else:
        path = Path(manifest)
        loaded = _select(load_manifest_file(path), source=str(path), base_dir=path.resolve().parent)
    if data_dir is not None:
        loaded.base_dir = Path(data_dir)
    return loaded


def example_count_source(loaded: LoadedManifest) -> str:
    if loaded.dataset is not None and loaded.dataset.spec.num_examples is not None:
        return (
            f"PrivateDataset {loaded.dataset.metadata.name!r} spec.numExamples={loaded.dataset.spec.num_examples} "
            "(public metadata; the trainer refuses data of another size)"
        )
    builtin = loaded.job.spec.dataset.builtin or (loaded.dataset.spec.source.builtin if loaded.dataset else None)
    if builtin is not None:
        return f"size of the built-in dataset {builtin!s} (public)"
    return "number of records in the data file"
