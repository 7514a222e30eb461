"""WatchedKube: the hot reads come from the watch's indexes, the operator's own writes are overlaid until the watch
catches up, and what the indexes do not hold is read from the API."""

from __future__ import annotations

from typing import Any

from dptrain_operator.render import JOB_UID_LABEL
from dptrain_operator.watched import INDEXES, WatchedKube
from tests.support.fakekube import FakeKube


class _Counting(FakeKube):
    """FakeKube that counts the API reads."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.reads.append("get_job")
        return super().get_job(namespace, name)

    def get_claim(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.reads.append("get_claim")
        return super().get_claim(namespace, name)

    def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        self.reads.append("list_pods")
        return super().list_pods(namespace, label_selector)

    def get_ledger(self, name: str) -> dict[str, Any] | None:
        self.reads.append("get_ledger")
        return super().get_ledger(name)


def _job(version: str, phase: str) -> dict[str, Any]:
    return {
        "apiVersion": "dptrain.io/v1alpha1",
        "kind": "DPTrainingJob",
        "metadata": {"namespace": "ns", "name": "j", "uid": "u1", "resourceVersion": version},
        "status": {"phase": phase},
    }


def _indexes(**contents: dict[Any, list[dict[str, Any]]]) -> dict[str, dict[Any, list[dict[str, Any]]]]:
    return {name: contents.get(name, {}) for name in INDEXES}


def test_reads_come_from_the_indexes_once_attached() -> None:
    api = _Counting()
    watched = WatchedKube(api)
    assert watched.get_job("ns", "j") is None  # not attached: the API
    assert api.reads == ["get_job"]
    pod = {"kind": "Pod", "metadata": {"namespace": "ns", "name": "j-attempt-1", "labels": {JOB_UID_LABEL: "u1"}}}
    watched.attach(_indexes(dptrain_jobs={("ns", "j"): [_job("5", "Running")]}, dptrain_pods={("ns", "u1"): [pod]}))
    assert watched.get_job("ns", "j")["status"]["phase"] == "Running"  # type: ignore[index]
    assert watched.list_pods("ns", f"{JOB_UID_LABEL}=u1") == [pod]
    assert watched.list_pods("ns", f"{JOB_UID_LABEL}=other") == []
    assert api.reads == ["get_job"]  # nothing more went to the API
    watched.list_pods("ns", "app=x")  # a selector the index does not answer: the API
    assert api.reads[-1] == "list_pods"


def test_the_operators_own_write_wins_until_the_watch_catches_up() -> None:
    api = _Counting()
    api.put(_job("1", "Pending"))
    jobs: dict[Any, list[dict[str, Any]]] = {("ns", "j"): [_job("1", "Pending")]}
    watched = WatchedKube(api)
    watched.attach(_indexes(dptrain_jobs=jobs))
    written = watched.patch_job_status("ns", "j", {"phase": "Running"})
    assert written is not None
    assert watched.get_job("ns", "j")["status"]["phase"] == "Running"  # type: ignore[index]  # the watch lags
    jobs[("ns", "j")] = [{**written, "status": {"phase": "Succeeded"}, "metadata": {**written["metadata"],
                          "resourceVersion": str(int(written["metadata"]["resourceVersion"]) + 1)}}]  # fmt: skip
    assert watched.get_job("ns", "j")["status"]["phase"] == "Succeeded"  # type: ignore[index]  # newer: the watch


def test_a_claim_nobody_labelled_is_read_from_the_api_and_a_known_one_is_never_posted() -> None:
    api = _Counting()
    squatted = {"kind": "PersistentVolumeClaim", "apiVersion": "v1", "metadata": {"namespace": "ns", "name": "c"}}
    api.put(squatted)
    watched = WatchedKube(api)
    watched.attach(_indexes())
    assert watched.get_claim("ns", "c") is not None  # not in the index (no label): the API sees it
    assert api.reads == ["get_claim"]
    ours = {"kind": "PersistentVolumeClaim", "metadata": {"namespace": "ns", "name": "mine", "resourceVersion": "3"}}
    watched.attach(_indexes(dptrain_claims={("ns", "mine"): [ours]}))
    assert watched.create_if_absent({**ours, "metadata": {"namespace": "ns", "name": "mine"}}) is False
    assert api.get("PersistentVolumeClaim", "ns", "mine") is None  # no POST went out


def _ledger_with(watched: WatchedKube, spent: float) -> dict[str, Any]:
    raw = watched.get_ledger("l")
    assert raw is not None
    return watched.replace_ledger_status({**raw, "status": {"epsilonSpent": spent}})


def test_a_ledger_is_read_once_then_served_from_what_the_operator_wrote() -> None:
    api = _Counting()
    watched = WatchedKube(api)
    watched.create_ledger({"kind": "PrivacyLedger", "metadata": {"name": "l"}})
    _ledger_with(watched, 1.0)
    _ledger_with(watched, 2.0)
    assert watched.get_ledger("l")["status"]["epsilonSpent"] == 2.0  # type: ignore[index]
    assert api.reads == ["get_ledger"]  # only the first read (after the create) went to the API


def test_a_ledger_someone_else_wrote_is_read_again_after_the_failed_write_and_after_the_cache_time() -> None:
    import pytest

    from dptrain_operator.kube import ConflictError
    from dptrain_operator.watched import LEDGER_CACHE_SECONDS

    api = _Counting()
    watched = WatchedKube(api)
    now = [0.0]
    watched.clock = lambda: now[0]
    watched.create_ledger({"kind": "PrivacyLedger", "metadata": {"name": "l"}})
    stale = watched.get_ledger("l")
    assert stale is not None
    other = WatchedKube(api)  # another writer (a replica during a rollout)
    _ledger_with(other, 5.0)
    with pytest.raises(ConflictError):  # the precondition holds: the stale copy cannot be written over
        watched.replace_ledger_status({**stale, "status": {"epsilonSpent": 1.0}})
    assert watched.get_ledger("l")["status"]["epsilonSpent"] == 5.0  # type: ignore[index]  # read again
    _ledger_with(other, 6.0)
    assert watched.get_ledger("l")["status"]["epsilonSpent"] == 5.0  # type: ignore[index]  # within the cache time
    now[0] += LEDGER_CACHE_SECONDS
    assert watched.get_ledger("l")["status"]["epsilonSpent"] == 6.0  # type: ignore[index]


def test_every_handler_id_makes_a_valid_progress_annotation() -> None:
    """kopf stores a retried handler's progress in an annotation named after the handler's id: an invalid name makes
    every retry fail with 422 (a deletion waiting for its pods never finished)."""
    import re

    import kopf

    from dptrain_operator.handlers import register
    from tests.support.fakekube import fake_context

    registry = kopf.OperatorRegistry()
    register(registry, fake_context(FakeKube()))
    storage = kopf.AnnotationsProgressStorage(prefix="dptrain.io")
    name_part = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
    ids = [handler.id for handler in registry._changing.get_all_handlers()]
    ids += [handler.id for handler in registry._spawning.get_all_handlers()]
    assert len(ids) == 20
    for key in (key for handler_id in ids for key in storage.make_keys(handler_id)):
        prefix, _, name = key.partition("/")
        assert prefix == "dptrain.io"
        assert name_part.match(name), key
        assert len(name) <= 63, key


def test_a_broken_invariant_is_permanent_and_counted_but_a_deletion_keeps_retrying() -> None:
    import kopf
    import pytest

    from dptrain_operator.handlers import _counted
    from tests.support.fakekube import fake_context

    ctx = fake_context(FakeKube())

    def broken() -> None:
        raise AssertionError("a Reserved entry holds its plan")

    with pytest.raises(kopf.PermanentError, match="invariant violated"):
        _counted(ctx, "DPTrainingJob", broken, invariants_permanent=True)
    with pytest.raises(AssertionError):
        _counted(ctx, "DPTrainingJob", broken)  # deletion: kopf retries until the pods are settled
    assert ctx.metrics.reconcile_errors.labels(kind="DPTrainingJob")._value.get() == 2


def test_jobs_that_ask_for_an_expired_ledger_at_once_cause_one_read() -> None:
    import threading
    import time

    class _Slow(_Counting):
        def get_ledger(self, name: str) -> dict[str, Any] | None:
            time.sleep(0.05)  # long enough for every asking thread to arrive while the read is under way
            return super().get_ledger(name)

    api = _Slow()
    watched = WatchedKube(api)
    watched.create_ledger({"kind": "PrivacyLedger", "metadata": {"name": "l"}})
    threads = [threading.Thread(target=watched.get_ledger, args=("l",)) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert api.reads == ["get_ledger"]
