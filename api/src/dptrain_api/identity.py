"""The identity of a dataset: what its privacy ledger is keyed by, and what its holdout is derived from.

Two PrivateDatasets with the same identity describe the same records, so they must share one ledger; a
job's trainer refuses to read any dataset but the one its pod was admitted for.
"""

from __future__ import annotations

import hashlib
import posixpath

from dptrain_api.dataset import DatasetSource, PrivateDataset
from dptrain_api.job import DPTrainingJob

__all__ = ["dataset_identity", "holdout_key", "ledger_name", "normalized_path", "source_identity"]


def normalized_path(path: str) -> str:
    """A claim-relative path in one canonical spelling (``a/./b//c.csv`` → ``a/b/c.csv``)."""
    return posixpath.normpath(path).lstrip("/")


def source_identity(namespace: str, source: DatasetSource) -> str:
    """``<namespace>/builtin/<name>`` or ``<namespace>/file/<claim>/<normalized path>``."""
    if source.file is not None:
        return f"{namespace}/file/{source.file.claim_name}/{normalized_path(source.file.path)}"
    assert source.builtin is not None  # the schema requires exactly one
    return f"{namespace}/builtin/{source.builtin.value}"


def dataset_identity(job: DPTrainingJob, dataset: PrivateDataset | None) -> str:
    """The identity of the records ``job`` trains on: its PrivateDataset's source, or its built-in dataset."""
    if dataset is not None:
        return source_identity(dataset.metadata.namespace or job.metadata.namespace or "default", dataset.spec.source)
    assert job.spec.dataset.builtin is not None
    return f"builtin/{job.spec.dataset.builtin.value}"


def holdout_key(identity: str) -> bytes:
    """The key of the per-record holdout hash: fixed per dataset, so every job holds out the same records.

    It is derived from the (public) identity; the guarantee does not need it secret, because a record's side
    depends on that record alone and both sides are charged.
    """
    return hashlib.sha256(b"dptrain/holdout/v1\0" + identity.encode()).digest()


def ledger_name(identity: str) -> str:
    """Name of the cluster-scoped PrivacyLedger of a dataset identity (a DNS label)."""
    return "ledger-" + hashlib.sha256(identity.encode()).hexdigest()[:24]
