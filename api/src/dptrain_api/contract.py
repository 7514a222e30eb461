"""The contract between the operator and the trainer pods it starts, stated once.

Both sides import these names: the operator renders pods with :class:`PodEnv`, reads
:class:`TerminationMessage` and the :class:`TrainerMetric` series, and maps :class:`ExitCode` to a
failure :class:`Reason`; the trainer reads the same environment, writes the same message and
exports the same metrics. A change here is a change of the pod contract: bump
``TerminationMessage.version`` when a field changes meaning.
"""

from __future__ import annotations

import json
from enum import IntEnum, StrEnum
from typing import Annotated, Any, ClassVar, Final, Literal

from pydantic import ConfigDict, Field, ValidationError

from dptrain_api._base import ApiModel

__all__ = [
    "DEFAULT_TERMINATION_MESSAGE_PATH",
    "MAX_TERMINATION_MESSAGE_BYTES",
    "PERMANENT_FAILURES",
    "ConditionType",
    "ExitCode",
    "FederationMetric",
    "Mechanism",
    "PodEnv",
    "Reason",
    "ReservedMechanisms",
    "RunOutcome",
    "TerminationMessage",
    "TrainerMetric",
]

MAX_TERMINATION_MESSAGE_BYTES: Final = 4096
"""Kubernetes keeps at most 4096 bytes of a container's termination message."""

DEFAULT_TERMINATION_MESSAGE_PATH: Final = "/dev/termination-log"


class PodEnv(StrEnum):
    """Environment variables the operator sets on trainer pods (and `dptrain run` reads)."""

    JOB_NAME = "DPTRAIN_JOB_NAME"
    JOB_NAMESPACE = "DPTRAIN_JOB_NAMESPACE"
    JOB_UID = "DPTRAIN_JOB_UID"
    ATTEMPT = "DPTRAIN_ATTEMPT"
    """1 for the first trainer pod of a job, n for the n-th (a retry must find the journal of the earlier ones)."""
    RESERVED_MECHANISM = "DPTRAIN_RESERVED_MECHANISM"
    """JSON :class:`ReservedMechanisms` the operator reserved in the dataset ledger; the trainer never runs more."""
    DATASET_IDENTITY = "DPTRAIN_DATASET_IDENTITY"
    """The dataset identity the job was admitted for; the trainer refuses to read any other."""
    JOB_MANIFEST = "DPTRAIN_JOB_MANIFEST"
    """The job (and its PrivateDataset) as YAML: part of the immutable pod spec, so nobody can swap it later."""
    METRICS_ADDRESS = "DPTRAIN_METRICS_ADDRESS"
    CPU_LIMIT = "DPTRAIN_CPU_LIMIT"
    TERMINATION_MESSAGE_PATH = "DPTRAIN_TERMINATION_MESSAGE_PATH"
    LOCK_WAIT_SECONDS = "DPTRAIN_LOCK_WAIT_SECONDS"
    """Seconds a trainer waits for the checkpoint directory's lock (a previous pod may still be stopping)."""
    FEDERATION_EXPECTED_SITES = "DPTRAIN_FEDERATION_EXPECTED_SITES"
    """Comma-separated site names a federation's round 1 waits for (the coordinator pod)."""


class DistributedEnv(StrEnum):
    """torch.distributed environment of a multi-worker job's pods, in Kubeflow's conventions.

    The operator sets the ``PET_*`` variables (torchrun reads them as its own flags) on every pod of the gang;
    ``dptrain run`` launches ``PET_NPROC_PER_NODE`` processes per pod with torch.distributed.run, which sets
    ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_*`` for each. Pod i of N is node rank i; the master is pod 0,
    reached through the job's headless Service.
    """

    NNODES = "PET_NNODES"
    NPROC_PER_NODE = "PET_NPROC_PER_NODE"
    NODE_RANK = "PET_NODE_RANK"
    MASTER_ADDR = "PET_MASTER_ADDR"
    MASTER_PORT = "PET_MASTER_PORT"
    WORLD_SIZE = "WORLD_SIZE"
    RANK = "RANK"
    LOCAL_RANK = "LOCAL_RANK"
    LOCAL_WORLD_SIZE = "LOCAL_WORLD_SIZE"
    TORCH_MASTER_ADDR = "MASTER_ADDR"
    TORCH_MASTER_PORT = "MASTER_PORT"


DEFAULT_MASTER_PORT: Final = 29500
"""The port rank 0 listens on for torch.distributed's rendezvous (Kubeflow's default)."""

SUPERNODE_RUNTIME_PORT: Final = 9094
"""The port of a site's SuperNode Runtime API (its own SuperExec and ClientApps dial it; never exposed)."""


class ExitCode(IntEnum):
    """Exit codes of `dptrain run`: distinct per kind of failure, so the operator never parses messages."""

    SUCCEEDED = 0
    CRASHED = 1
    """An unexpected error (a bug, or the environment): retried."""
    INVALID_CONFIGURATION = 2
    INVALID_DATA = 3
    INVALID_MODEL = 4
    CHECKPOINT_UNUSABLE = 5
    """A damaged or lost privacy journal, or another job's checkpoint: retrying cannot help."""
    PRIVACY_BUDGET = 6
    JOURNAL_LOST = 7
    """A retry found no privacy journal: what earlier attempts spent is unknown, so nothing more may run."""
    AUDIT_CONTRADICTED = 8
    """`dptrain audit` only: the audit's lower bound on ε is above the claimed ε."""
    FEDERATION_ABORTED = 9
    """`dptrain federation site` only: the coordinator ended the federation without finishing it (the site stopped;
    what its journal charged is in the termination message)."""
    DECLARED_SIZE_MISMATCH = 10
    """The DP count of the held-out records is far from what the dataset's declared size implies (a wrong file)."""
    INTERRUPTED = 130
    """SIGINT (128 + 2)."""
    TERMINATED = 143
    """SIGTERM (128 + 15): stopped after checkpointing."""


class ConditionType(StrEnum):
    """Condition types of DPTrainingJob and PrivateDataset status."""

    ADMITTED = "Admitted"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"
    READY = "Ready"


class Reason(StrEnum):
    """Machine-readable reasons of conditions and events."""

    # admission
    ADMITTED = "Admitted"
    DATASET_NOT_FOUND = "DatasetNotFound"
    INVALID_SPEC = "InvalidSpec"
    INVALID_DATASET = "InvalidDataset"
    INVALID_PLAN = "InvalidPlan"
    PLAN_TIMEOUT = "PlanTimeout"
    IMAGE_NOT_ALLOWED = "ImageNotAllowed"
    BUDGET_EXCEEDED = "BudgetExceeded"
    # running
    STARTED = "Started"
    POD_CREATED = "PodCreated"
    RUNNING = "Running"
    RESUMED = "Resumed"
    SUSPENDED = "Suspended"
    ATTEMPT_FAILED = "AttemptFailed"
    SUCCEEDED = "Succeeded"
    # failures
    POD_FAILED = "PodFailed"
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    CHECKPOINT_LOST = "CheckpointLost"
    OOM_KILLED = "OOMKilled"
    """The trainer container was killed for memory: a retry with the same limit would be killed again."""
    CHILD_NAME_TAKEN = "ChildNameTaken"
    DELETED = "Deleted"
    INVALID_CONFIGURATION = "InvalidConfiguration"
    INVALID_DATA = "InvalidData"
    DECLARED_SIZE_MISMATCH = "DeclaredSizeMismatch"
    INVALID_MODEL = "InvalidModel"
    CHECKPOINT_UNUSABLE = "CheckpointUnusable"
    PRIVACY_BUDGET_EXHAUSTED = "PrivacyBudgetExhausted"
    JOURNAL_LOST = "JournalLost"
    # audits
    AUDIT_CONTRADICTS_EPSILON = "AuditContradictsEpsilon"
    AUDITED = "Audited"
    # federations
    FEDERATION_NOT_ALLOWED = "FederationNotAllowed"
    INSECURE_NOT_ALLOWED = "InsecureNotAllowed"
    NOT_ENOUGH_SITES = "NotEnoughSites"
    SITE_CREATED = "SiteCreated"
    SITE_REFUSED = "SiteRefused"
    SITE_FAILED = "SiteFailed"
    SITE_STOPPED = "SiteStopped"
    ROUND_COMPLETED = "RoundCompleted"
    FEDERATION_FAILED = "FederationFailed"
    FEDERATION_ABORTED = "FederationAborted"
    # datasets
    BUDGET_TRACKED = "BudgetTracked"
    BUDGET_SET = "BudgetSet"
    BUDGET_RAISED = "BudgetRaised"
    BUDGET_LOWERED = "BudgetLowered"
    BUDGET_DELTA_CHANGED = "BudgetDeltaChanged"
    BUDGET_BELOW_CHARGED = "BudgetBelowCharged"
    HOLDOUT_CHANGED = "HoldoutChanged"
    SOURCE_ALREADY_REGISTERED = "SourceAlreadyRegistered"
    DATASET_DELETED = "DatasetDeleted"
    JOBS_STILL_RUNNING = "JobsStillRunning"


PERMANENT_FAILURES: Final[dict[ExitCode, Reason]] = {
    ExitCode.INVALID_CONFIGURATION: Reason.INVALID_CONFIGURATION,
    ExitCode.INVALID_DATA: Reason.INVALID_DATA,
    ExitCode.DECLARED_SIZE_MISMATCH: Reason.DECLARED_SIZE_MISMATCH,
    ExitCode.INVALID_MODEL: Reason.INVALID_MODEL,
    ExitCode.CHECKPOINT_UNUSABLE: Reason.CHECKPOINT_UNUSABLE,
    ExitCode.PRIVACY_BUDGET: Reason.PRIVACY_BUDGET_EXHAUSTED,
    ExitCode.JOURNAL_LOST: Reason.JOURNAL_LOST,
    ExitCode.FEDERATION_ABORTED: Reason.FEDERATION_ABORTED,
}
"""Trainer exits that retrying cannot fix: the job fails at once with this reason."""


class TrainerMetric(StrEnum):
    """Prometheus series a trainer exports (labels `job`, `namespace`); the operator scrapes some of them."""

    EPSILON_SPENT = "dptrain_epsilon_spent"
    EPSILON_TARGET = "dptrain_epsilon_target"
    DELTA = "dptrain_delta"
    NOISE_MULTIPLIER = "dptrain_noise_multiplier"
    SAMPLE_RATE = "dptrain_sample_rate"
    HOLDOUT_LOSS = "dptrain_holdout_loss"
    """Held-out loss, released with DP (the training loss itself is never released)."""
    EVAL_ACCURACY = "dptrain_eval_accuracy"
    """Held-out accuracy, released with DP."""
    EVAL_AUC = "dptrain_eval_auc"
    """Held-out ROC AUC (binary tasks), released with DP."""
    PROGRESS_RATIO = "dptrain_progress_ratio"
    PLANNED_STEPS = "dptrain_planned_steps"
    CHARGED_STEPS = "dptrain_charged_steps"
    CHARGED_RELEASES = "dptrain_charged_releases"
    STEPS = "dptrain_steps"
    """A counter: exposed as ``dptrain_steps_total``."""
    ATTEMPT = "dptrain_attempt"
    TRAINING_FINISHED = "dptrain_training_finished"
    AUDIT_EPSILON_LOWER_BOUND = "dptrain_audit_epsilon_lower_bound"
    """ε̂ of the empirical privacy audit (spec.audit): the pipeline is not (ε, δ)-DP below it."""
    AUDIT_EPSILON = "dptrain_audit_epsilon"
    """The claimed ε the audit is compared with (the job's DP-SGD steps at δ)."""


class FederationMetric(StrEnum):
    """Prometheus series of a federation, labelled ``federation`` and ``namespace`` (the coordinator's, or the site's
    own) and, per site, ``site``. Everything here is public (privacy parameters, counts of rounds and steps) or a DP
    release (the global metric: the sum of the sites' DP held-out releases)."""

    ROUNDS_COMPLETED = "dptrain_federation_rounds_completed"
    ROUNDS_TOTAL = "dptrain_federation_rounds_total"
    ROUND_SECONDS = "dptrain_federation_round_seconds"
    """Wall time of the last round (timing is not DP: it depends on the sites' batch sizes)."""
    SITES_MIN = "dptrain_federation_sites_min"
    SITE_EPSILON_SPENT = "dptrain_federation_site_epsilon_spent"
    """ε a site's privacy journal has charged so far (label site)."""
    SITE_EPSILON_TARGET = "dptrain_federation_site_epsilon_target"
    SITE_STEPS = "dptrain_federation_site_steps"
    """DP-SGD steps a site's journal charged (label site)."""
    SITE_PLANNED_STEPS = "dptrain_federation_site_planned_steps"
    SITE_ROUNDS = "dptrain_federation_site_rounds"
    """Rounds whose update from the site was aggregated (label site)."""
    GLOBAL_ACCURACY = "dptrain_federation_global_accuracy"
    """The global model's held-out accuracy: the sum of the sites' DP releases."""
    GLOBAL_AUC = "dptrain_federation_global_auc"
    GLOBAL_LOSS = "dptrain_federation_global_loss"
    FINISHED = "dptrain_federation_finished"


class RunOutcome(StrEnum):
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    INTERRUPTED = "Interrupted"


class Mechanism(ApiModel):
    """``steps`` Poisson-subsampled Gaussian steps with noise multiplier σ and sample rate q."""

    noise_multiplier: Annotated[float, Field(gt=0)]
    """σ: Gaussian noise standard deviation relative to the clipping norm."""
    sample_rate: Annotated[float, Field(gt=0, le=1)]
    """q: Poisson sampling probability of each record."""
    steps: Annotated[int, Field(ge=0)]
    """Number of steps."""


class ReservedMechanisms(ApiModel):
    """What the operator reserved for a job: DP-SGD steps on the training partition, and the Gaussian releases of
    held-out metrics on the holdout (``sampleRate`` 1; none when the job releases none)."""

    train: Mechanism
    holdout: Mechanism | None = None


class TerminationMessage(ApiModel):
    """What a trainer pod says when it ends (its termination message, compact JSON of at most 4096 bytes).

    ``chargedSteps`` (DP-SGD steps) and ``chargedReleases`` (held-out metric releases) are what the write-ahead
    privacy journal proves was charged, over every attempt; ``None`` means unknown, and the operator then keeps
    the whole reservation charged. ``evalMetrics`` are the last DP-released held-out metrics.
    """

    # Trainers and operators of neighbouring releases may meet: ignore fields this side does not know.
    model_config = ApiModel.model_config | ConfigDict(extra="ignore")
    CURRENT_VERSION: ClassVar[int] = 1

    version: Literal[1] = 1
    status: RunOutcome
    exit_code: int
    reason: str | None = None
    """Name of the error, for failures."""
    error: str | None = None
    """What went wrong and what to fix, for failures (never the content of a record)."""
    epsilon: float | None = None
    """ε charged by the journal so far, at ``delta``, by ``accountant``."""
    delta: float | None = None
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    planned_steps: int | None = None
    planned_epsilon: float | None = None
    accountant: str | None = None
    max_grad_norm: float | None = None
    charged_steps: int | None = None
    charged_releases: int | None = None
    holdout_noise_multiplier: float | None = None
    planned_releases: int | None = None
    steps_run: int | None = None
    attempts: int | None = None
    eval_metric: str | None = None
    eval_metrics: dict[str, float] = Field(default_factory=dict)
    clipping_mode: str | None = None
    journal_entries: int | None = None
    segments: list[Mechanism] = Field(default_factory=list)
    """The charged mechanism as compacted segments (dropped first when the message is too long)."""
    warnings: str | None = None
    audit_epsilon_lower_bound: float | None = None
    """ε̂ of the empirical privacy audit (spec.audit), when one ran after training."""
    audit_epsilon: float | None = None
    """The claimed ε the audit was compared with."""
    audit_confidence: float | None = None

    def to_text(self, limit: int = MAX_TERMINATION_MESSAGE_BYTES) -> str:
        """Compact JSON within ``limit`` bytes: drops the segments, then shortens the texts, as needed."""
        message = self.model_copy()

        def encoded() -> str:
            return json.dumps(message.to_wire(), separators=(",", ":"), allow_nan=False)

        text = encoded()
        if len(text.encode()) > limit and message.segments:
            message.segments = []
            text = encoded()
        for key in ("warnings", "error"):
            value = getattr(message, key)
            overflow = len(text.encode()) - limit
            if overflow <= 0 or not value:
                continue
            keep = max(0, len(value.encode()) - overflow - 16)
            setattr(message, key, value.encode()[:keep].decode(errors="ignore") + "…")
            text = encoded()
        if len(text.encode()) > limit:  # last resort: only the privacy numbers
            message.eval_metrics = {}
            message.warnings = message.error = message.reason = None
            text = encoded()
        return text

    @classmethod
    def parse(cls, text: str | None) -> TerminationMessage | None:
        """The message in ``text``, or None when there is none or it is not a message of this contract."""
        if not text:
            return None
        try:
            raw: Any = json.loads(text)
            if not isinstance(raw, dict) or raw.get("version") != cls.CURRENT_VERSION:
                return None
            return cls.model_validate(raw)
        except (ValueError, ValidationError):
            return None
