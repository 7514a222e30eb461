"""Reconciliation of a federation's coordinator (DPFederatedJob). Level-triggered and idempotent like the jobs'.

For each in-cluster site it creates the site's DPFederatedSite in that namespace (reconciled by
:mod:`dptrain_operator.handlers.sites`) and waits until every one is admitted or refused; with at least minSites able
to take part (external sites count), it runs the coordinator pod (Flower's SuperLink and the run) behind a Service,
restarts it (resuming from the last round's global checkpoint) up to backoffLimit, mirrors rounds, per-site ε and the
global DP metric into its status, and tells the in-cluster sites to stop when it ends. It never reads a site's data,
ledger or Secrets.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from dptrain_api import (
    ConditionType,
    CoordinatorReport,
    DPFederatedJob,
    DPFederatedJobStatus,
    DPFederatedSiteStatus,
    FederationMetric,
    FederationPhase,
    GlobalMetricStatus,
    Reason,
    RoundsStatus,
    SiteStatus,
    describe_validation_error,
)
from dptrain_operator import ledger, pods
from dptrain_operator.conditions import now
from dptrain_operator.context import OperatorContext
from dptrain_operator.handlers.charged import (
    Reconciliation,
    write_reconciled,
)
from dptrain_operator.handlers.sites import insecure_refusal
from dptrain_operator.render import owned_by
from dptrain_operator.render.federation import (
    coordinator_claim,
    coordinator_claim_name,
    coordinator_pod,
    site_manifest,
    site_name,
    superlink_address,
    superlink_service,
    superlink_service_name,
)
from dptrain_operator.scrape import scrape_federation
from dptrain_operator.state import FINISHED, PENDING, RUNNING, ObjectState, parse_status

__all__ = ["FederationState", "delete_federation", "reconcile_federation", "reconcile_federation_and_write"]

Logger = logging.Logger | logging.LoggerAdapter[Any]
Pod = dict[str, Any]
FederationState = ObjectState[DPFederatedJobStatus, FederationPhase]


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
            self.state.fail(Reason.INSECURE_NOT_ALLOWED, insecure_refusal(self.ctx))
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
        values = scrape_federation(pod, self.ctx.settings.trainer_metrics_port)
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
