"""What reconciling a DPTrainingJob and a DPFederatedSite share: each holds an entry in a PrivacyLedger that only the
operator writes; it runs one attempt (a pod, or a gang led by worker 0) at a time next to the records, each pod
keeping a finalizer until its end is recorded in the entry; and when the object ends, the entry is committed at what
the last trainer's journal reported, or kept in full when that is unknown. Never from what the object's own status
says: the status is a display of the entry.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import kopf
from pydantic import ValidationError

from dptrain_api import (
    PERMANENT_FAILURES,
    ConditionType,
    ExitCode,
    LedgerEntry,
    PrivacySpec,
    PrivacyStatus,
    PrivateDataset,
    Reason,
    RunOutcome,
    TerminationMessage,
    describe_validation_error,
)
from dptrain_operator import admission, ledger, pods
from dptrain_operator.context import OperatorContext
from dptrain_operator.render import TRAINER_FINALIZER, owned_by
from dptrain_operator.state import PENDING, SUCCEEDED, ObjectState

Logger = logging.Logger | logging.LoggerAdapter[Any]
Pod = dict[str, Any]
State = TypeVar("State", bound=ObjectState[Any, Any])
_STOPPED_BY_US = (ExitCode.TERMINATED, ExitCode.INTERRUPTED)


class Reconciliation(Generic[State]):
    """One reconciliation of one object: its state as read (and its status as it will be written), the operator."""

    def __init__(self, state: State, ctx: OperatorContext, logger: Logger) -> None:
        self.state = state
        self.ctx, self.logger = ctx, logger

    @property
    def namespace(self) -> str:
        return self.state.namespace

    @property
    def uid(self) -> str:
        return self.state.uid


class ChargedReconciliation(Reconciliation[State]):
    """One reconciliation of an object that charges a PrivacyLedger entry (``self.ledger``, keyed by its UID)."""

    noun = "object"
    """What the object is called in messages ("job", "site")."""

    def __init__(self, state: State, ctx: OperatorContext, logger: Logger) -> None:
        super().__init__(state, ctx, logger)
        self.dataset: PrivateDataset | None = None
        self.ledger = ""

    def _pods(self) -> list[Pod]:
        return pods.job_pods(self.ctx.kube, self.namespace, self.uid)

    # --- the dataset and its ledger -------------------------------------------------------------------------

    def _read_dataset(self, name: str) -> PrivateDataset | None:
        """PrivateDataset ``name`` of the object's namespace; None (the object waits, or failed) when it is missing
        or invalid."""
        raw = self.ctx.kube.get_dataset(self.namespace, name)
        if raw is None:
            message = f"PrivateDataset {name!r} not found in namespace {self.namespace}; create it"
            self.state.transition(PENDING, Reason.DATASET_NOT_FOUND, message)
            self.state.condition(ConditionType.ADMITTED, False, Reason.DATASET_NOT_FOUND, message)
            return None
        try:
            dataset = PrivateDataset.model_validate(raw)
        except ValidationError as error:
            problems = "; ".join(describe_validation_error(error))
            self.state.fail(Reason.INVALID_DATASET, f"PrivateDataset {name!r} is invalid: {problems}")
            return None
        if dataset.metadata.namespace is None:
            dataset.metadata.namespace = self.namespace
        return dataset

    def _bound(self, status: Any) -> bool:
        """The ledger describes the object's PrivateDataset (not another one over the same source)."""
        if self.dataset is None:
            return True
        bound = status.dataset
        if bound is not None and bound.uid == self.dataset.metadata.uid:
            return True
        if bound is None:
            message = f"PrivateDataset {self.dataset.metadata.name!r} is not ready yet (its ledger is being opened)"
            self.state.transition(PENDING, Reason.DATASET_NOT_FOUND, message)
            self.state.condition(ConditionType.ADMITTED, False, Reason.DATASET_NOT_FOUND, message)
            return False
        self.state.fail(
            Reason.INVALID_DATASET,
            f"PrivateDataset {self.dataset.metadata.name!r} describes the same records as PrivateDataset "
            f"{bound.name!r}, which keeps their budget; use that one",
        )
        return False

    def _image_allowed(self, image: str | None) -> bool:
        """Only the operator's images run next to a PrivateDataset's records (spec.image unset: the default)."""
        if self.dataset is None or self.ctx.settings.allows_image(image):
            return True
        self.state.fail(
            Reason.IMAGE_NOT_ALLOWED,
            f"spec.image {image!r} is not an allowed trainer image: only the operator's images may run next to a "
            "PrivateDataset's records (ask the operator's administrator to add it to trainer.allowedImages, or "
            "leave spec.image unset)",
        )
        return False

    def _show_planned_privacy(self, entry: LedgerEntry, spec: PrivacySpec) -> None:
        """status.privacy's plan (σ, q, steps) from the ledger entry, and the attempts made."""
        privacy = self.state.status.privacy or PrivacyStatus(epsilon_spent=0.0, steps=0)
        train = entry.train
        assert train is not None
        self.state.status.privacy = privacy.model_copy(
            update={
                "target_epsilon": spec.target_epsilon,
                "delta": spec.delta,
                "noise_multiplier": train.noise_multiplier,
                "sample_rate": train.sample_rate,
                "planned_steps": train.steps if entry.state == "Reserved" else privacy.planned_steps or train.steps,
                "accountant": spec.accountant,
            }
        )
        self.state.status.attempts = entry.pods

    # --- recording in the entry -----------------------------------------------------------------------------

    def _update(self, change: Callable[[LedgerEntry], LedgerEntry]) -> LedgerEntry:
        status = admission.write_ledger(self.ctx, self.ledger, lambda s: ledger.update_entry(s, self.uid, change))
        entry = ledger.find_entry(status, self.uid)
        assert entry is not None
        return entry

    def _settle(self, pod: Pod, *, report: TerminationMessage | None, failed: bool) -> LedgerEntry:
        """Record in the ledger that ``pod`` ended: whether its trainer ran, what it reported charged."""
        name = pod["metadata"]["name"]

        def record(entry: LedgerEntry) -> LedgerEntry:
            if name in entry.settled_pods:
                return entry
            return entry.model_copy(
                update={
                    "settled_pods": [*entry.settled_pods, name],
                    "started_pods": entry.started_pods + (1 if pods.trainer_ran(pod) else 0),
                    "failed_pods": entry.failed_pods + (1 if failed else 0),
                    "observed_steps": max(entry.observed_steps, (report.charged_steps or 0) if report else 0),
                    "observed_releases": max(entry.observed_releases, (report.charged_releases or 0) if report else 0),
                }
            )

        return self._update(record)

    def _commit(self, *, report: TerminationMessage | None, outcome: str, message: str) -> None:
        """Make the entry final at what ``report`` charged (None: in full, the plan)."""
        steps = report.charged_steps if report is not None else None
        releases = report.charged_releases if report is not None else None
        status = admission.write_ledger(
            self.ctx,
            self.ledger,
            lambda s: ledger.commit(s, self.uid, steps=steps, releases=releases, outcome=outcome, message=message),
        )
        if ledger.find_entry(status, self.uid) is not None:  # final: no ended pod has anything more to tell
            self._release_ended()

    def _fail_and_commit(self, reason: Reason, message: str, *, report: TerminationMessage | None) -> None:
        self._commit(report=report, outcome=reason, message=message)
        self.state.fail(reason, message)

    def _child_name_taken(self, kind: str, name: str, entry: LedgerEntry) -> None:
        """A child's name is held by an object not made for this one: fail, charged for what ran (nothing yet:
        nothing)."""
        self._fail_and_commit(
            Reason.CHILD_NAME_TAKEN,
            f"a {kind} named {name} exists and was not created for this {self.noun}; delete it or rename the "
            f"{self.noun}",
            report=None if entry.started_pods else nothing_ran(),
        )

    def _release_settled(self, entry: LedgerEntry, live: list[Pod]) -> None:
        """Remove the finalizer of every ended pod whose end ``entry`` has recorded."""
        for pod in live:
            if pod["metadata"]["name"] in entry.settled_pods and pods.ended(pod):
                remove_finalizer(self.ctx, pod)

    def _release_ended(self) -> None:
        """Remove the finalizer of every ended pod: the ledger no longer needs to hear from them."""
        for pod in self._pods():
            if pods.ended(pod):
                remove_finalizer(self.ctx, pod)

    # --- stopping and ending --------------------------------------------------------------------------------

    def _stop_and_settle(self, entry: LedgerEntry) -> tuple[LedgerEntry, TerminationMessage | None] | None:
        """Delete the live pods; once all have ended, record them: (the entry, the last report), or None while a
        pod still runs. What to commit: the last report, or, when no trainer ever ran, nothing at all."""
        live = self._pods()
        for pod in live:
            if not pods.ended(pod) and not pod["metadata"].get("deletionTimestamp"):
                self.ctx.kube.delete_pod(self.namespace, pod["metadata"]["name"])
        if any(not pods.ended(pod) for pod in live):
            return None
        report = None
        for pod in live:
            if pods.worker(pod) != 0:
                continue  # only a leader's end is recorded: it alone ran the journal
            if pod["metadata"]["name"] not in entry.settled_pods:
                code = pods.code(pod)
                entry = self._settle(pod, report=pods.report(pod), failed=code not in (*_STOPPED_BY_US, 0, None))
            report = pods.report(pod) or report
            remove_finalizer(self.ctx, pod)
        if report is None and not entry.started_pods:
            report = nothing_ran()
        return entry, report

    def _claim_intact(self, entry: LedgerEntry, manifest: dict[str, Any]) -> bool:
        """Create the journal's claim on first use and record its UID in the ledger. A claim this object did not
        create, or one replaced since (deleted and re-created empty), means the journal of earlier attempts is
        unknown or gone: the object fails instead of retrying, charged in full unless nothing ever ran."""
        name = manifest["metadata"]["name"]
        claim = self.ctx.kube.get_claim(self.namespace, name)  # read first: creating is for the first time only
        if claim is None:
            self.ctx.kube.create_if_absent(manifest)
            claim = self.ctx.kube.get_claim(self.namespace, name)
        if claim is None:
            return False  # created a moment ago and not readable yet: next time
        uid = str(claim["metadata"]["uid"])
        if not owned_by(claim, self.uid):
            reason = Reason.CHILD_NAME_TAKEN
            message = (
                f"a PersistentVolumeClaim named {name} exists and was not created for this {self.noun}; delete it "
                f"or rename the {self.noun} (its contents cannot be trusted as this {self.noun}'s privacy journal)"
            )
        elif entry.checkpoint_claim_uid is None:
            self._update(lambda e: e.model_copy(update={"checkpoint_claim_uid": uid}))
            return True
        elif entry.checkpoint_claim_uid == uid:
            return True
        else:
            reason = Reason.CHECKPOINT_LOST
            message = (
                f"checkpoint claim {name} was replaced while the {self.noun} ran: the privacy journal of earlier "
                f"attempts is gone, so their spend stays charged in full; create a new {self.noun} to train again"
            )
        stopped = self._stop_and_settle(entry)
        if stopped is not None:  # what the journal said is no longer to be trusted: in full, unless nothing ran
            self._fail_and_commit(reason, message, report=None if stopped[0].started_pods else nothing_ran())
        return False

    def _show_committed(self, entry: LedgerEntry, *, default_message: str) -> None:
        """A committed entry is final whatever the object's status says: stop what runs, show the outcome."""
        for pod in self._pods():
            if not pods.ended(pod):
                self.ctx.kube.delete_pod(self.namespace, pod["metadata"]["name"])
        self._release_ended()
        if entry.outcome == Reason.SUCCEEDED:
            if self.state.phase != SUCCEEDED:
                self.state.succeed(entry.message or default_message)
        elif not self.state.finished:
            self.state.fail(reason_of(entry.outcome), entry.message or "failed")

    # --- deletion -----------------------------------------------------------------------------------------------

    def _delete(self, *, claim_name: str) -> None:
        """On deletion: stop the pods, wait until they have ended (their finalizers keep them), commit the entry at
        what the last trainer's journal reported (in full when unknown), then remove the pods and the claim."""
        entry = self._find_entry()
        if entry is not None and entry.state == "Reserved":
            stopped = self._stop_and_settle(entry)
            if stopped is None:
                raise kopf.TemporaryError(f"waiting for the {self.noun}'s pods to stop", delay=2)
            self._commit(report=stopped[1], outcome=Reason.DELETED, message=f"the {self.noun} was deleted")
        for pod in self._pods():
            if not pods.ended(pod):
                self.ctx.kube.delete_pod(self.namespace, pod["metadata"]["name"])
            remove_finalizer(self.ctx, pod)
        claim = self.ctx.kube.get_claim(self.namespace, claim_name)
        if claim is not None and owned_by(claim, self.uid):
            self.ctx.kube.delete_claim(self.namespace, claim_name)

    def _find_entry(self) -> LedgerEntry | None:
        """The entry: in the ledger the dataset names, else (the dataset is gone) in whichever ledger has it."""
        candidates = [self.ledger] if self.ledger else []
        candidates += [
            raw["metadata"]["name"] for raw in self.ctx.kube.list_ledgers() if raw["metadata"]["name"] not in candidates
        ]
        for name in candidates:
            raw = self.ctx.kube.get_ledger(name)
            if raw is None:
                continue
            entry = ledger.find_entry(admission.parse_status(raw), self.uid)
            if entry is not None:
                self.ledger = name
                return entry
        return None


def write_reconciled(
    read: Callable[[], dict[str, Any] | None],
    reconcile: Callable[[dict[str, Any]], State],
    patch: Callable[[dict[str, Any]], Any],
    *,
    uid: str,
) -> tuple[dict[str, Any], State] | None:
    """Read the object fresh, reconcile it and write its status when it changed: (the object as read, its state
    with the events still to post), or None when it is gone, being deleted or was re-created (another UID)."""
    fresh = read()
    if fresh is None or fresh["metadata"]["uid"] != uid or fresh["metadata"].get("deletionTimestamp"):
        return None
    state = reconcile(fresh)
    if state.changed():
        patch(state.wire())
    return fresh, state


def nothing_ran() -> TerminationMessage:
    """What to commit when no trainer of the object ever started: nothing was charged."""
    return TerminationMessage(status=RunOutcome.FAILED, exit_code=0, charged_steps=0, charged_releases=0)


def finished_cleanly(report: TerminationMessage | None) -> bool:
    return report is not None and report.exit_code == 0 and report.status == RunOutcome.SUCCEEDED


def remove_finalizer(ctx: OperatorContext, pod: Pod) -> None:
    if TRAINER_FINALIZER in (pod["metadata"].get("finalizers") or []):
        admission.retry_on_conflict(
            lambda: ctx.kube.remove_pod_finalizer(
                ctx.kube.get_pod(pod["metadata"]["namespace"], pod["metadata"]["name"]) or pod, TRAINER_FINALIZER
            ),
            what=f"releasing pod {pod['metadata']['name']}",
            retries=5,
        )


def permanent_failure(code: int | None) -> Reason | None:
    """The failure reason of a trainer exit that retrying cannot fix (None: retry)."""
    try:
        return PERMANENT_FAILURES.get(ExitCode(code)) if code is not None else None
    except ValueError:
        return None


def reason_of(outcome: str | None) -> Reason:
    """A committed entry's outcome as a Reason (PodFailed when it is none we know)."""
    try:
        return Reason(outcome or Reason.POD_FAILED)
    except ValueError:
        return Reason.POD_FAILED
