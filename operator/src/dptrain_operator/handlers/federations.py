"""Reconciliation of federations: the coordinator's DPFederatedJob and a site's DPFederatedSite. Level-triggered and
idempotent like the jobs' (create/update events and a timer call the same functions).

**A site** (DPFederatedSite, reconciled by the operator watching the site's namespace — in this cluster or in the
hospital's own): its PrivateDataset must name the federation in ``spec.allowFederations`` (else FederationNotAllowed,
nothing reserved); its whole plan (σ, q = batchSize / its declared training size, rounds × localSteps steps, and the
held-out releases) is reserved in the dataset's PrivacyLedger before round 1, like a DPTrainingJob's (Refused:
BudgetExceeded); then one SuperNode pod at a time runs next to the data, each attempt continuing the site's journal on
its claim, with the record-outcome finalizer; when the site ends, the entry is committed at what its journal proves
ran (the SuperNode's termination message), or kept in full when that is unknown.

**The coordinator** (DPFederatedJob): for each in-cluster site it creates the site's DPFederatedSite in that namespace
and waits until every one is admitted or refused; with at least minSites able to take part (external sites count),
it runs the coordinator pod (Flower's SuperLink and the run) behind a Service, restarts it (resuming from the last
round's global checkpoint) up to backoffLimit, mirrors rounds, per-site ε and the global DP metric into its status,
and tells the in-cluster sites to stop when it ends. It never reads a site's data, ledger or Secrets.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from dptrain_accounting import AccountingError, MechanismPlan, plan_fixed_steps
from dptrain_api import (
    ConditionType,
    CoordinatorReport,
    DPFederatedJob,
    DPFederatedJobStatus,
    DPFederatedSite,
    DPFederatedSiteStatus,
    FederationMetric,
    FederationPhase,
    GlobalMetricStatus,
    LedgerEntry,
    PrivacyStatus,
    PrivateDataset,
    Reason,
    ReservedMechanisms,
    RoundsStatus,
    SiteStatus,
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
    Reconciliation,
    finished_cleanly,
    permanent_failure,
    write_reconciled,
)
from dptrain_operator.render import owned_by
from dptrain_operator.render.federation import (
    coordinator_claim,
    coordinator_claim_name,
    coordinator_pod,
    site_claim,
    site_claim_name,
    site_manifest,
    site_name,
    superlink_address,
    superlink_service,
    superlink_service_name,
    supernode_pod,
    supernode_pod_name,
)
from dptrain_operator.state import FINISHED, PENDING, RUNNING, ObjectState, parse_status
from dptrain_operator.workers import AccountingTimeout

__all__ = ["delete_federation", "delete_site", "reconcile_federation", "reconcile_site"]

Logger = logging.Logger | logging.LoggerAdapter[Any]
Pod = dict[str, Any]
SiteState = ObjectState[DPFederatedSiteStatus, FederationPhase]
FederationState = ObjectState[DPFederatedJobStatus, FederationPhase]


def _scrape(pod: Pod, port: int) -> dict[str, dict[str, float]]:
    """The pod's federation series: metric name → {site label (or ""): value}. Empty when it does not answer."""
    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        return {}
    try:
        response = httpx.get(f"http://{ip}:{port}/metrics", timeout=2.0)
        response.raise_for_status()
    except httpx.HTTPError:
        return {}
    values: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name.startswith("dptrain_federation_"):
                values.setdefault(sample.name, {})[sample.labels.get("site", "")] = float(sample.value)
    return values


def _insecure_refusal(ctx: OperatorContext) -> str:
    return (
        "superlink.insecure (plain HTTP, no TLS, no SuperNode authentication) is not allowed by this operator; use "
        "TLS (tlsSecretName / caSecretName) — insecure federations are for tests on one machine "
        "(DPTRAIN_FEDERATION_ALLOW_INSECURE)"
    )


# ======================================================================================================================
# A site
# ======================================================================================================================


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
            self.state.fail(Reason.INSECURE_NOT_ALLOWED, _insecure_refusal(self.ctx))
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
        values = _scrape(pod, self.ctx.settings.trainer_metrics_port)
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


# ======================================================================================================================
# The coordinator
# ======================================================================================================================


class FederationReconciliation(Reconciliation[FederationState]):
    """One reconciliation of one DPFederatedJob (by the operator watching the coordinator's namespace)."""

    def __init__(self, body: dict[str, Any], ctx: OperatorContext, logger: Logger) -> None:
        super().__init__(ObjectState(body, parse_status(body, DPFederatedJobStatus), FederationPhase), ctx, logger)
        self.job: DPFederatedJob

    def run(self) -> FederationState:
        try:
            self.job = DPFederatedJob.model_validate(self.state.body)
        except ValidationError as error:
            self.state.fail(Reason.INVALID_SPEC, "; ".join(describe_validation_error(error)))
            return self.state
        spec = self.job.spec
        status = self.state.status
        status.rounds = status.rounds or RoundsStatus(completed=0, total=spec.training.rounds)
        status.superlink_address = spec.superlink.external_address or superlink_address(self.job, self.ctx.settings)
        if self.state.phase in FINISHED:
            self._stop_sites()
            self._ttl()
            return self.state
        if spec.superlink.insecure and not self.ctx.settings.federation_allow_insecure:
            self.state.fail(Reason.INSECURE_NOT_ALLOWED, _insecure_refusal(self.ctx))
            return self.state
        if not self.ctx.settings.allows_image(spec.image):
            self.state.fail(Reason.IMAGE_NOT_ALLOWED, f"spec.image {spec.image!r} is not an allowed trainer image")
            return self.state
        able, pending = self._sites()
        if pending:
            message = f"waiting for the sites' operators to admit {', '.join(pending)}"
            self.state.transition(PENDING, Reason.STARTED, message)
            self.state.condition(ConditionType.ADMITTED, False, Reason.STARTED, message)
            return self.state
        if len(able) < spec.min_sites:
            self._fail(
                Reason.NOT_ENOUGH_SITES,
                f"only {len(able)} site(s) can take part ({', '.join(able) or 'none'}), fewer than "
                f"minSites={spec.min_sites}; see status.sites for why the others cannot",
            )
            return self.state
        self.state.condition(
            ConditionType.ADMITTED, True, Reason.ADMITTED, f"{len(able)} site(s) can take part: {', '.join(able)}"
        )
        if not self._deadline():
            self._coordinate(able)
        return self.state

    # --- sites ----------------------------------------------------------------------------------------------

    @property
    def _rounds(self) -> RoundsStatus:
        """status.rounds (run() sets it before anything reads it)."""
        rounds = self.state.status.rounds
        assert rounds is not None
        return rounds

    def _site_status(self, name: str) -> SiteStatus:
        for site in self.state.status.sites:
            if site.name == name:
                return site
        site = SiteStatus(name=name)
        self.state.status.sites.append(site)
        return site

    def _sites(self) -> tuple[list[str], list[str]]:
        """Create each in-cluster site's DPFederatedSite; (sites able to take part, sites not decided yet)."""
        able: list[str] = []
        pending: list[str] = []
        for site in self.job.spec.sites:
            shown = self._site_status(site.name)
            shown.external = site.external
            if site.external:
                shown.phase = shown.phase or "Unknown"
                able.append(site.name)
                continue
            assert site.namespace is not None
            name = site_name(self.state.name, site.name)
            raw = self.ctx.kube.get_site(site.namespace, name)  # read first: creating is for the first time only
            if raw is None and self.ctx.kube.create_if_absent(
                site_manifest(self.job, site, settings=self.ctx.settings)
            ):
                self.state.event(Reason.SITE_CREATED, f"created DPFederatedSite {site.namespace}/{name}")
                raw = self.ctx.kube.get_site(site.namespace, name)
            labels = ((raw or {}).get("metadata") or {}).get("labels") or {}
            if raw is None:
                pending.append(site.name)
                continue
            if labels.get("dptrain.io/federation-uid") != self.uid:
                shown.phase, shown.reason = "Failed", Reason.CHILD_NAME_TAKEN.value
                shown.message = f"DPFederatedSite {site.namespace}/{name} exists and belongs to another federation"
                continue
            decision = self._mirror_site(shown, raw)
            if decision == "able":
                able.append(site.name)
            elif decision == "pending":
                pending.append(site.name)
        return able, pending

    def _mirror_site(self, shown: SiteStatus, raw: dict[str, Any]) -> str:
        """Copy a site's public status; "able" once its operator admitted it (reserved its plan), "refused" when it
        was refused before that, "pending" while undecided."""
        status = parse_status(raw, DPFederatedSiteStatus)
        failed = next((c for c in status.conditions if c.type == ConditionType.FAILED and c.status == "True"), None)
        admitted = next((c for c in status.conditions if c.type == ConditionType.ADMITTED), None)
        was_admitted = admitted is not None and admitted.status == "True"
        shown.phase = status.phase.value if status.phase else "Pending"
        if failed is not None:
            shown.reason, shown.message = failed.reason, failed.message[:500]
        elif admitted is not None:
            shown.reason, shown.message = admitted.reason, admitted.message[:500]
        if failed is not None and not was_admitted:
            shown.phase = "Refused"
        elif was_admitted and shown.phase == "Pending":
            shown.phase = "Admitted"
        privacy = status.privacy
        if privacy is not None:
            shown.target_epsilon = privacy.target_epsilon
            shown.planned_steps = privacy.planned_steps
            if privacy.epsilon_spent is not None:
                shown.epsilon_spent = max(shown.epsilon_spent or 0.0, privacy.epsilon_spent)
            if privacy.steps is not None:
                shown.steps = max(shown.steps or 0, privacy.steps)
        if status.rounds is not None:
            shown.rounds = max(shown.rounds or 0, status.rounds)
        if was_admitted:
            return "able"
        return "refused" if failed is not None else "pending"

    def _stop_sites(self) -> None:
        """The federation ended: every in-cluster site still running leaves (its charge is then committed)."""
        for site in self.job.spec.sites:
            if site.external or site.namespace is None:
                continue
            name = site_name(self.state.name, site.name)
            raw = self.ctx.kube.get_site(site.namespace, name)
            if raw is None or (raw["metadata"].get("labels") or {}).get("dptrain.io/federation-uid") != self.uid:
                continue
            status = parse_status(raw, DPFederatedSiteStatus)
            if status.phase not in FINISHED and not raw.get("spec", {}).get("stop"):
                self.ctx.kube.patch_site_spec(site.namespace, name, {"stop": True})
            if status.phase is not None:
                self._mirror_site(self._site_status(site.name), raw)

    # --- the coordinator pod --------------------------------------------------------------------------------

    def _coordinator_pods(self) -> list[Pod]:
        return pods.job_pods(self.ctx.kube, self.namespace, self.uid)

    def _coordinate(self, able: list[str]) -> None:
        claim, service = coordinator_claim(self.job), superlink_service(self.job)
        if self.ctx.kube.get_claim(self.namespace, claim["metadata"]["name"]) is None:  # read first: no POST-409
            self.ctx.kube.create_if_absent(claim)
        if self.ctx.kube.get_child("Service", self.namespace, service["metadata"]["name"]) is None:
            self.ctx.kube.create_if_absent(service)
        live = self._coordinator_pods()
        if any(pods.terminating(pod) for pod in live):
            return
        current = live[-1] if live else None
        if current is None:
            self._start(1, able)
        elif not pods.ended(current):
            self._observe(current)
        else:
            self._ended(current, able, failures=sum(1 for pod in live if pods.phase(pod) == "Failed"))

    def _start(self, number: int, able: list[str]) -> None:
        manifest = coordinator_pod(self.job, number=number, expected_sites=able, settings=self.ctx.settings)
        name = manifest["metadata"]["name"]
        if self.ctx.kube.create_if_absent(manifest):
            self.state.event(Reason.POD_CREATED, f"created coordinator pod {name} (attempt {number})")
        elif not owned_by(self.ctx.kube.get_pod(self.namespace, name) or {}, self.uid):
            self._fail(Reason.CHILD_NAME_TAKEN, f"a pod named {name} exists and was not created for this federation")
            return
        self.state.status.attempts = number
        if self.state.status.start_time is None:
            self.state.status.start_time = now()
        self.state.transition(PENDING, Reason.STARTED, f"coordinator attempt {number} started")
        self.state.condition(ConditionType.RUNNING, True, Reason.POD_CREATED, f"coordinator pod {name}")

    def _observe(self, pod: Pod) -> None:
        if pods.phase(pod) != "Running":
            return
        self.state.transition(RUNNING, Reason.RUNNING, f"coordinator {pod['metadata']['name']} runs")
        values = _scrape(pod, self.ctx.settings.trainer_metrics_port)
        if not values:
            return
        status = self.state.status
        completed = values.get(FederationMetric.ROUNDS_COMPLETED, {}).get("")
        if completed is not None and int(completed) > (self._rounds.completed or 0):
            self._rounds.completed = int(completed)
            self.state.event(Reason.ROUND_COMPLETED, f"round {int(completed)} of {self._rounds.total} aggregated")
        for metric, attribute in (
            (FederationMetric.SITE_EPSILON_SPENT, "epsilon_spent"),
            (FederationMetric.SITE_STEPS, "steps"),
            (FederationMetric.SITE_ROUNDS, "rounds"),
            (FederationMetric.SITE_EPSILON_TARGET, "target_epsilon"),
            (FederationMetric.SITE_PLANNED_STEPS, "planned_steps"),
        ):
            for site, value in values.get(metric, {}).items():
                if site and site in {s.name for s in self.job.spec.sites}:
                    shown = self._site_status(site)
                    cast = float(value) if attribute in ("epsilon_spent", "target_epsilon") else int(value)
                    current = getattr(shown, attribute)
                    setattr(shown, attribute, cast if current is None else max(current, cast))
        name = self.job.spec.data.metric
        source = FederationMetric.GLOBAL_AUC if name == "auc" else FederationMetric.GLOBAL_ACCURACY
        metric_value = values.get(source, {}).get("")
        if metric_value is not None:
            loss = values.get(FederationMetric.GLOBAL_LOSS, {}).get("")
            status.global_metric = GlobalMetricStatus(metric=name, value=metric_value, loss=loss)

    def _ended(self, pod: Pod, able: list[str], *, failures: int) -> None:
        text = ((pod.get("status") or {}).get("containerStatuses") or [{}])[0].get("state", {}).get("terminated", {})
        report = CoordinatorReport.parse(text.get("message")) if text else None
        if report is not None:
            self._show_report(report)
        if pods.phase(pod) == "Succeeded":
            metric = self.state.status.global_metric
            summary = f"{self._rounds.completed} rounds aggregated"
            if metric is not None and metric.value is not None:
                summary += f"; global model {metric.metric}={metric.value:.4g} (DP, summed over the sites' releases)"
            self.state.succeed(summary)
            self._stop_sites()
            return
        error = (report.error if report else None) or f"the coordinator exited with code {pods.code(pod)}"
        limit = self.job.spec.run_policy.backoff_limit
        if report is not None and report.reason == "RoundFailedError":
            self._fail(Reason.FEDERATION_FAILED, error)
            return
        if failures > limit:
            self._fail(
                Reason.BACKOFF_LIMIT_EXCEEDED,
                f"{failures} coordinator pods failed (backoffLimit {limit}); last: {error}",
            )
            return
        self.state.event(
            Reason.ATTEMPT_FAILED,
            f"coordinator attempt {pods.number(pod)} failed ({error}); resuming from the last round's checkpoint",
            warning=True,
        )
        self._start(pods.number(pod) + 1, able)

    def _show_report(self, report: CoordinatorReport) -> None:
        status = self.state.status
        self._rounds.completed = max(self._rounds.completed or 0, report.completed_rounds)
        for site in report.sites:
            shown = self._site_status(site.name)
            if site.epsilon is not None:
                shown.epsilon_spent = max(shown.epsilon_spent or 0.0, ledger.round_up(site.epsilon))
            if site.steps is not None:
                shown.steps = max(shown.steps or 0, site.steps)
            shown.rounds = max(shown.rounds or 0, site.rounds)
            shown.target_epsilon = site.target_epsilon or shown.target_epsilon
            shown.planned_steps = site.planned_steps or shown.planned_steps
        if report.global_metric is not None:
            status.global_metric = report.global_metric

    def _fail(self, reason: Reason, message: str) -> None:
        for pod in self._coordinator_pods():
            if not pods.ended(pod):
                self.ctx.kube.delete_pod(self.namespace, pod["metadata"]["name"])
        self.state.fail(reason, message)
        self._stop_sites()

    def _deadline(self) -> bool:
        deadline = self.job.spec.run_policy.active_deadline_seconds
        started = self.state.status.start_time
        if deadline is None or started is None:
            return False
        elapsed = (datetime.now(UTC) - started).total_seconds()
        if elapsed <= deadline:
            return False
        self._fail(Reason.DEADLINE_EXCEEDED, f"the federation ran {elapsed:.0f}s, longer than activeDeadlineSeconds")
        return True

    def _ttl(self) -> None:
        ttl = self.job.spec.run_policy.ttl_seconds_after_finished
        finished = self.state.status.completion_time
        if ttl is not None and finished is not None and (datetime.now(UTC) - finished).total_seconds() >= ttl:
            self.ctx.kube.delete_federation(self.namespace, self.state.name)


def reconcile_federation(body: dict[str, Any], ctx: OperatorContext, logger: Logger) -> FederationState:
    return FederationReconciliation(body, ctx, logger).run()


def reconcile_federation_and_write(
    ctx: OperatorContext, namespace: str, name: str, uid: str, logger: Logger
) -> FederationState | None:
    written = write_reconciled(
        lambda: ctx.kube.get_federation(namespace, name),
        lambda fresh: reconcile_federation(fresh, ctx, logger),
        lambda status: ctx.kube.patch_federation_status(namespace, name, status),
        uid=uid,
    )
    return written[1] if written is not None else None


def delete_federation(body: dict[str, Any], ctx: OperatorContext, logger: Logger) -> None:
    """On deletion: delete the in-cluster sites (each commits its charge on its own), the coordinator pods, the
    Service and the claim."""
    metadata = body["metadata"]
    namespace, name, uid = metadata["namespace"], metadata["name"], metadata["uid"]
    try:
        job = DPFederatedJob.model_validate(body)
    except ValidationError:
        job = None
    if job is not None:
        for site in job.spec.sites:
            if site.namespace is None:
                continue
            found = ctx.kube.get_site(site.namespace, site_name(name, site.name))
            if found is not None and (found["metadata"].get("labels") or {}).get("dptrain.io/federation-uid") == uid:
                ctx.kube.delete_site(site.namespace, site_name(name, site.name))
    for pod in pods.job_pods(ctx.kube, namespace, uid):
        if not pods.ended(pod):
            ctx.kube.delete_pod(namespace, pod["metadata"]["name"])
    ctx.kube.delete_service(namespace, superlink_service_name(name))
    claim = ctx.kube.get_claim(namespace, coordinator_claim_name(name))
    if claim is not None and owned_by(claim, uid):
        ctx.kube.delete_claim(namespace, coordinator_claim_name(name))


# ======================================================================================================================
# kopf registration (called by handlers.register)
# ======================================================================================================================

FEDERATIONS = "dpfederatedjobs"
SITES = "dpfederatedsites"
