"""Reconciliation of a site's DPFederatedSite (by the operator watching the site's namespace — in this cluster or
in the hospital's own). Level-triggered and idempotent like the jobs' (create/update events, pod events and a timer
call the same function).

Its PrivateDataset must name the federation in ``spec.allowFederations`` (else FederationNotAllowed, nothing
reserved); its whole plan (σ, q = batchSize / its declared training size, rounds × localSteps steps, and the held-out
releases) is reserved in the dataset's PrivacyLedger before round 1, like a DPTrainingJob's (Refused:
BudgetExceeded); then one SuperNode pod at a time runs next to the data, each attempt continuing the site's journal on
its claim, with the record-outcome finalizer; when the site ends, the entry is committed at what its journal proves
ran (the SuperNode's termination message), or kept in full when that is unknown.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from dptrain_accounting import AccountingError, MechanismPlan, plan_fixed_steps
from dptrain_api import (
    ConditionType,
    DPFederatedSite,
    DPFederatedSiteStatus,
    FederationMetric,
    FederationPhase,
    LedgerEntry,
    PrivacyStatus,
    PrivateDataset,
    Reason,
    ReservedMechanisms,
    TerminationMessage,
    dataset_allows,
    dataset_shape,
    describe_validation_error,
    ledger_name,
    site_plan_inputs,
    source_identity,
)
from dptrain_operator import admission, ledger, pods
from dptrain_operator.conditions import now
from dptrain_operator.context import OperatorContext
from dptrain_operator.handlers.charged import (
    ChargedReconciliation,
    finished_cleanly,
    permanent_failure,
    write_reconciled,
)
from dptrain_operator.render import owned_by
from dptrain_operator.render.federation import (
    site_claim,
    site_claim_name,
    supernode_pod,
    supernode_pod_name,
)
from dptrain_operator.scrape import scrape_federation
from dptrain_operator.state import PENDING, RUNNING, ObjectState, parse_status
from dptrain_operator.workers import AccountingTimeout

__all__ = ["SiteState", "delete_site", "insecure_refusal", "reconcile_site", "reconcile_site_and_write"]

Logger = logging.Logger | logging.LoggerAdapter[Any]
Pod = dict[str, Any]
SiteState = ObjectState[DPFederatedSiteStatus, FederationPhase]


def insecure_refusal(ctx: OperatorContext) -> str:
    return (
        "superlink.insecure (plain HTTP, no TLS, no SuperNode authentication) is not allowed by this operator; use "
        "TLS (tlsSecretName / caSecretName) — insecure federations are for tests on one machine "
        "(DPTRAIN_FEDERATION_ALLOW_INSECURE)"
    )


class SiteReconciliation(ChargedReconciliation[SiteState]):
    """One reconciliation of one DPFederatedSite (by the operator watching its namespace)."""

    noun = "site"

    def __init__(self, body: dict[str, Any], ctx: OperatorContext, logger: Logger) -> None:
        super().__init__(ObjectState(body, parse_status(body, DPFederatedSiteStatus), FederationPhase), ctx, logger)
        self.site: DPFederatedSite
        self.identity = ""

    def run(self) -> SiteState:
        try:
            self.site = DPFederatedSite.model_validate(self.state.body)
        except ValidationError as error:
            self.state.fail(Reason.INVALID_SPEC, "; ".join(describe_validation_error(error)))
            return self.state
        if not self._load_dataset():
            return self.state
        entry = self._entry(admit=not self.state.finished)
        if entry is None:
            return self.state
        self._show_plan(entry)
        if entry.state == "Refused":
            self.state.fail(Reason(entry.outcome or Reason.BUDGET_EXCEEDED), entry.message or "refused")
        elif entry.state == "Committed":
            self._finished(entry)
        else:
            self._run(entry)
        return self.state

    # --- consent, plan, reservation ------------------------------------------------------------------------

    def _load_dataset(self) -> bool:
        spec = self.site.spec
        if spec.superlink.insecure and not self.ctx.settings.federation_allow_insecure:
            self.state.fail(Reason.INSECURE_NOT_ALLOWED, insecure_refusal(self.ctx))
            return False
        self.dataset = self._read_dataset(spec.dataset_ref.name)
        if self.dataset is None:
            return False
        self.identity = source_identity(self.namespace, self.dataset.spec.source)
        self.ledger = ledger_name(self.identity)
        return True

    def _consent_message(self) -> str | None:
        """Why the dataset does not (or no longer) consent to this federation; None when it does."""
        assert self.dataset is not None
        federation = self.site.spec.federation
        if dataset_allows(self.dataset, federation):
            return None
        return (
            f"PrivateDataset {self.dataset.metadata.name!r} does not allow federation "
            f"{federation.namespace}/{federation.name}: its data steward must add "
            f"{{namespace: {federation.namespace}, name: {federation.name}}} to spec.allowFederations"
        )

    def _entry(self, *, admit: bool) -> LedgerEntry | None:
        assert self.dataset is not None
        _, status = admission.open_ledger(
            self.ctx,
            identity=self.identity,
            namespace=self.namespace,
            dataset=self.dataset,
            holdout=self.dataset.spec.holdout_fraction,
        )
        if not self._bound(status):
            return None
        self.state.status.ledger_name = self.ledger
        entry = ledger.find_entry(status, self.uid)
        if entry is not None or not admit:
            return entry
        refusal = self._consent_message()
        if refusal is not None:
            self.state.fail(Reason.FEDERATION_NOT_ALLOWED, refusal)
            self.state.condition(ConditionType.ADMITTED, False, Reason.FEDERATION_NOT_ALLOWED, refusal)
            return None
        shape, classes = dataset_shape(self.dataset)
        data = self.site.spec.data
        if (tuple(shape), classes) != (tuple(data.input_shape), data.num_classes):
            self.state.fail(
                Reason.INVALID_DATASET,
                f"PrivateDataset {self.dataset.metadata.name!r} has shape {list(shape)} and {classes} classes; the "
                f"federation's data is {data.input_shape} with {data.num_classes} classes",
            )
            return None
        if not self._image_allowed(self.site.spec.image):
            return None
        plan = self._plan(status.holdout_fraction)
        if plan is None:
            return None
        entry = self._admit(plan)
        if entry.state == "Reserved":
            message = (
                f"reserved in PrivateDataset {self.dataset.metadata.name} (ledger {self.ledger}): σ="
                f"{plan.noise_multiplier:.4g}, q={plan.sample_rate:.4g}, {plan.steps} steps "
                f"({self.site.spec.training.rounds} rounds × {self.site.spec.training.local_steps})"
            )
            if plan.releases:
                message += f", {plan.releases} held-out releases (σ={plan.holdout_noise_multiplier:.4g})"
            self.state.condition(ConditionType.ADMITTED, True, Reason.ADMITTED, message)
            self.state.event(Reason.ADMITTED, message)
        return entry

    def _plan(self, holdout: float | None) -> MechanismPlan | None:
        assert self.dataset is not None
        inputs = site_plan_inputs(self.site.spec, self.dataset, holdout=holdout)
        try:
            return self.ctx.workers.call(plan_fixed_steps, **inputs.as_kwargs())
        except (AccountingError, ValueError) as error:
            self.state.fail(Reason.INVALID_PLAN, str(error))
        except AccountingTimeout:
            self.state.fail(Reason.PLAN_TIMEOUT, "planning the site did not finish in time; lower rounds or localSteps")
        return None

    def _admit(self, plan: MechanismPlan) -> LedgerEntry:
        federation = self.site.spec.federation
        entry = LedgerEntry(
            job_name=self.state.name,
            job_namespace=self.namespace,
            job_uid=self.uid,
            kind="DPFederatedSite",
            federation=f"{federation.namespace}/{federation.name}",
            state="Refused",
        )
        return admission.admit(
            self.ctx,
            self.ledger,
            entry=entry,
            plan=plan,
            needs="the site's plan needs",
            advice="The site cannot take part; the other sites go on if enough remain",
        )

    def _show_plan(self, entry: LedgerEntry) -> None:
        self._show_planned_privacy(entry, self.site.spec.privacy)
        privacy = self.state.status.privacy
        if entry.state == "Committed" and privacy is not None and entry.train is not None:
            privacy.steps = entry.train.steps

    # --- running -----------------------------------------------------------------------------------------------

    def _run(self, entry: LedgerEntry) -> None:
        refusal = self._consent_message()
        if self.site.spec.stop and refusal is None:
            # The coordinator's operator sets spec.stop when the federation ends: a SuperNode that already finished
            # (exit 0, its report written) before this reconciliation saw it ended is a success, not a stop.
            current = next((pod for pod in self._pods() if pods.number(pod) == entry.pods), None)
            if (
                current is not None
                and pods.phase(current) == "Succeeded"
                and current["metadata"]["name"] not in entry.settled_pods
            ):
                self._pod_ended(entry, current)
                return
        if self.site.spec.stop or refusal is not None:
            reason = Reason.SITE_STOPPED if refusal is None else Reason.FEDERATION_NOT_ALLOWED
            message = refusal or "spec.stop: the site left the federation (what its journal charged stays charged)"
            self._stop_and_commit(entry, reason, message)
            return
        deadline = self.site.spec.active_deadline_seconds
        started = self.state.status.start_time
        if deadline is not None and started is not None and (datetime.now(UTC) - started).total_seconds() > deadline:
            self._stop_and_commit(entry, Reason.DEADLINE_EXCEEDED, f"the site ran longer than {deadline}s")
            return
        if not self._claim_intact(entry, site_claim(self.site)):
            return
        live = self._pods()
        if any(pods.terminating(pod) for pod in live):
            return
        current = next((pod for pod in live if pods.number(pod) == entry.pods), None)
        latest_settled = supernode_pod_name(self.state.name, entry.pods) in entry.settled_pods
        if entry.pods == 0 or latest_settled:
            self._start_pod(entry, number=entry.pods + 1)
        elif current is None:
            self._start_pod(entry, number=entry.pods)
        elif not pods.ended(current):
            self._observe(current)
        else:
            self._pod_ended(entry, current)
        self._release_settled(entry, live)

    def _start_pod(self, entry: LedgerEntry, *, number: int) -> None:
        assert self.dataset is not None
        assert entry.train is not None
        if number > entry.pods:
            entry = self._update(lambda e: e.model_copy(update={"pods": number}))
        dataset = self.dataset
        fixed = ((self.ctx.kube.get_ledger(self.ledger) or {}).get("status") or {}).get("holdoutFraction")
        if fixed is not None and fixed != dataset.spec.holdout_fraction:
            dataset = dataset.model_copy(update={"spec": dataset.spec.model_copy(update={"holdout_fraction": fixed})})
        manifest = supernode_pod(
            self.site,
            dataset=dataset,
            number=number,
            attempt=entry.started_pods + 1,
            reserved=ReservedMechanisms(train=entry.train, holdout=entry.holdout),
            identity=self.identity,
            settings=self.ctx.settings,
        )
        name = manifest["metadata"]["name"]
        if self.ctx.kube.create_if_absent(manifest):
            self.state.event(Reason.POD_CREATED, f"created SuperNode pod {name}")
        elif not owned_by(self.ctx.kube.get_pod(self.namespace, name) or {}, self.uid):
            self._child_name_taken("pod", name, entry)
            return
        self.state.status.attempts = number
        if self.state.status.start_time is None:
            self.state.status.start_time = now()
        self.state.transition(PENDING, Reason.STARTED, f"SuperNode attempt {number} started")
        self.state.condition(ConditionType.RUNNING, True, Reason.POD_CREATED, f"SuperNode pod {name}")

    def _observe(self, pod: Pod) -> None:
        if pods.phase(pod) != "Running":
            return
        self.state.transition(RUNNING, Reason.RUNNING, f"SuperNode {pod['metadata']['name']} runs")
        values = scrape_federation(pod, self.ctx.settings.trainer_metrics_port)
        if not values:
            return
        site = self.site.spec.site_name
        privacy = self.state.status.privacy or PrivacyStatus()
        epsilon = values.get(FederationMetric.SITE_EPSILON_SPENT, {}).get(site)
        steps = values.get(FederationMetric.SITE_STEPS, {}).get(site)
        rounds = values.get(FederationMetric.SITE_ROUNDS, {}).get(site)
        if epsilon is not None:
            privacy.epsilon_spent = max(privacy.epsilon_spent or 0.0, ledger.round_up(epsilon))
        if steps is not None:
            privacy.steps = max(privacy.steps or 0, int(steps))
        if rounds is not None:
            self.state.status.rounds = int(rounds)
        self.state.status.privacy = privacy

    def _show_report(self, report: TerminationMessage) -> None:
        privacy = self.state.status.privacy or PrivacyStatus()
        if report.epsilon is not None:
            privacy.epsilon_spent = max(privacy.epsilon_spent or 0.0, ledger.round_up(report.epsilon))
        if report.charged_steps is not None:
            privacy.steps = report.charged_steps
        if report.steps_run is not None:
            self.state.status.rounds = report.steps_run
        self.state.status.privacy = privacy

    def _pod_ended(self, entry: LedgerEntry, pod: Pod) -> None:
        report = pods.report(pod)
        if report is not None:
            self._show_report(report)
        code = pods.code(pod)
        if pods.phase(pod) == "Succeeded":
            self._settle(pod, report=report, failed=False)
            self._succeed(report)
            return
        error = (report.error if report else None) or f"the SuperNode exited with code {code}"
        permanent = permanent_failure(code)
        failures, limit = entry.failed_pods + 1, self.site.spec.backoff_limit
        if permanent is None and failures <= limit:
            self.logger.warning(f"SuperNode attempt {entry.pods} failed ({error}); restarting (journal continues)")
            self.state.event(Reason.ATTEMPT_FAILED, f"SuperNode attempt {entry.pods} failed: {error}", warning=True)
            entry = self._settle(pod, report=report, failed=True)
            self._start_pod(entry, number=entry.pods + 1)
            return
        reason = permanent or Reason.BACKOFF_LIMIT_EXCEEDED
        self._settle(pod, report=report, failed=True)
        message = self._summary(error if permanent else f"{failures} SuperNode pods failed; last: {error}")
        self._fail_and_commit(reason, message, report=report)

    def _succeed(self, report: TerminationMessage | None) -> None:
        message = self._summary("the federation finished")
        self._commit(report=report, outcome=Reason.SUCCEEDED, message=message)
        self.state.status.global_model = f"{site_claim_name(self.state.name)}:global-model.pt"
        self.state.succeed(message)

    def _summary(self, text: str) -> str:
        privacy = self.state.status.privacy or PrivacyStatus()
        if privacy.epsilon_spent is None:
            return text
        return (
            f"{text}; ε={privacy.epsilon_spent:.4g} ≤ {self.site.spec.privacy.target_epsilon:g} ({privacy.steps} steps)"
        )

    def _stop_and_commit(self, entry: LedgerEntry, reason: Reason, message: str) -> None:
        stopped = self._stop_and_settle(entry)
        if stopped is None:
            return
        report = stopped[1]
        if report is not None:
            self._show_report(report)
        if reason == Reason.SITE_STOPPED and finished_cleanly(report):
            # The federation ended and the SuperNode finished it (exit 0, a Succeeded report) while the
            # coordinator's stop was on its way (its SIGTERM cut the reply grace short): a success, charged the same.
            self._succeed(report)
            return
        self._fail_and_commit(reason, message, report=report)

    def _finished(self, entry: LedgerEntry) -> None:
        self._show_committed(entry, default_message="the federation finished")


def reconcile_site(body: dict[str, Any], ctx: OperatorContext, logger: Logger) -> SiteState:
    return SiteReconciliation(body, ctx, logger).run()


def reconcile_site_and_write(
    ctx: OperatorContext, namespace: str, name: str, uid: str, logger: Logger
) -> SiteState | None:
    written = write_reconciled(
        lambda: ctx.kube.get_site(namespace, name),
        lambda fresh: reconcile_site(fresh, ctx, logger),
        lambda status: ctx.kube.patch_site_status(namespace, name, status),
        uid=uid,
    )
    return written[1] if written is not None else None


def delete_site(body: dict[str, Any], ctx: OperatorContext, logger: Logger) -> None:
    """On deletion: stop the SuperNode, wait until it ended, commit what its journal reported (in full when unknown),
    then remove the pods and the journal claim."""
    work = SiteReconciliation(body, ctx, logger)
    try:
        work.site = DPFederatedSite.model_validate(body)
    except ValidationError:
        return
    raw = ctx.kube.get_dataset(work.namespace, work.site.spec.dataset_ref.name)
    if raw is not None:
        dataset = PrivateDataset.model_validate(raw)
        work.identity = source_identity(work.namespace, dataset.spec.source)
        work.ledger = ledger_name(work.identity)
    work._delete(claim_name=site_claim_name(work.state.name))
