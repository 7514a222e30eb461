"""DPTrainingJob: one differentially private training run (DP-SGD with Poisson sampling)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import ConfigDict, Field, model_validator

from dptrain_api._base import IMMUTABLE, ApiModel, kubernetes_rule
from dptrain_api.common import (
    GROUP_VERSION,
    BuiltinDataset,
    Condition,
    LocalObjectReference,
    ObjectMeta,
    Quantity,
    Toleration,
)

PositiveInt = Annotated[int, Field(ge=1)]


class Accountant(StrEnum):
    """Privacy accountants that give a valid upper bound on ε. GDP is refused: it can under-report."""

    PLD = "pld"
    PRV = "prv"
    RDP = "rdp"


class JobPhase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


class DatasetSpec(ApiModel):
    """Which data to train on: exactly one of `builtin` or `datasetRef`."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                kubernetes_rule(
                    "has(self.builtin) != has(self.datasetRef)",
                    "set exactly one of dataset.builtin or dataset.datasetRef",
                )
            ]
        }
    )

    builtin: BuiltinDataset | None = None
    """A built-in dataset that ships with the trainer: flchain, breast-cancer or digits."""
    dataset_ref: LocalObjectReference | None = None
    """A PrivateDataset in the same namespace; its privacy budget is charged for this job."""

    @model_validator(mode="after")
    def _exactly_one_source(self) -> DatasetSpec:
        if (self.builtin is None) == (self.dataset_ref is None):
            raise ValueError("set exactly one of dataset.builtin or dataset.datasetRef")
        return self


class ModelSpec(ApiModel):
    """The network to train."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                kubernetes_rule(
                    "(has(self.architecture) && self.architecture == 'custom') == has(self.factory)",
                    "model.factory is required when architecture is custom, and only then",
                    field_path=".factory",
                )
            ]
        }
    )

    architecture: Literal["logistic", "mlp", "cnn", "custom"] = "mlp"
    """logistic (linear), mlp, cnn (for image datasets such as digits) or custom (see factory)."""
    hidden_sizes: Annotated[list[PositiveInt], Field(max_length=8)] = Field(default=[64])
    """mlp only: width of each hidden layer."""
    channels: Annotated[list[PositiveInt], Field(min_length=1, max_length=6)] = Field(default=[16, 32])
    """cnn only: output channels of each convolution block."""
    activation: Literal["tanh", "relu"] = "tanh"
    """Hidden activation. tanh is the usual choice under DP-SGD (bounded activations clip better)."""
    factory: Annotated[str, Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")] | None = None
    """custom only: `module:function` returning a torch.nn.Module, called with
    (num_features, num_classes, input_shape, **factoryArgs)."""
    factory_args: dict[str, Any] = Field(default={}, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})
    """custom only: keyword arguments passed to the factory."""
    pretrained_weights: Annotated[str, Field(min_length=1)] | None = None
    """Path (or file:// URI) of PUBLIC pretrained weights (a torch state_dict) to start from. Never private data."""

    @model_validator(mode="after")
    def _factory_iff_custom(self) -> ModelSpec:
        if (self.architecture == "custom") != (self.factory is not None):
            raise ValueError("model.factory is required when architecture is custom, and only then")
        return self


class PrivacySpec(ApiModel):
    """The differential-privacy guarantee to enforce. Immutable after creation."""

    target_epsilon: Annotated[float, Field(gt=0, le=100)]
    """Privacy budget ε for the whole job; the smallest noise that keeps the final ε at or below it is used."""
    delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    """δ of the (ε, δ) guarantee. Must be below 1/number of training examples."""
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0
    """Per-example gradient clipping bound C (L2 norm)."""
    accountant: Accountant = Accountant.PLD
    """pld (tightest, Google dp_accounting), prv (Opacus) or rdp (looser). All give valid upper bounds."""
    noise_multiplier: Annotated[float, Field(gt=0)] | None = None
    """Fix σ instead of calibrating it; the job is refused if the planned ε would exceed targetEpsilon."""
    secure_noise: bool = True
    """Draw the noise (and the Poisson sampling) from ChaCha20 keyed from the OS, a CSPRNG; false: from torch's
    generator (seeded from the OS, fast, predictable from enough of its outputs). Both draw Gaussians in float64
    with tails to ±13σ. false is for public (built-in) data only: refused with a datasetRef and in federations."""


class OptimisationSpec(ApiModel):
    """What one DP-SGD step does: the logical and physical batch and the optimizer applied to the noised gradient.
    A job's training and a federation site's local training share it."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                kubernetes_rule(
                    "!has(self.maxPhysicalBatchSize) || self.maxPhysicalBatchSize <= self.batchSize",
                    "maxPhysicalBatchSize must be at most batchSize",
                    field_path=".maxPhysicalBatchSize",
                )
            ]
        }
    )

    batch_size: Annotated[int, Field(ge=1)] = 256
    """Expected logical batch size. Batches are Poisson-sampled with rate batchSize / training examples."""
    max_physical_batch_size: Annotated[int, Field(ge=1)] | None = None
    """Largest micro-batch held in memory at once; logical batches are split to fit. Defaults to batchSize."""
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    """Optimizer applied to the noised gradients (a federation site restarts it every round from the global model)."""
    learning_rate: Annotated[float, Field(gt=0, le=100)] = 0.1
    """Learning rate."""
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    """sgd only: momentum."""
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    """L2 weight decay."""

    @model_validator(mode="after")
    def _physical_fits_logical(self) -> Self:
        if self.max_physical_batch_size is not None and self.max_physical_batch_size > self.batch_size:
            raise ValueError("maxPhysicalBatchSize must be at most batchSize")
        return self

    @property
    def physical_batch_size(self) -> int:
        return self.max_physical_batch_size or self.batch_size


class TrainingSpec(OptimisationSpec):
    """The optimisation plan. Immutable after creation: it fixes the sample rate and step count."""

    epochs: Annotated[float, Field(gt=0, le=10000)] = 10.0
    """Passes over the training data (fractions allowed); steps = ceil(epochs / sampleRate)."""
    clipping: Literal["auto", "bookkeeping", "ghost", "hooks"] = "auto"
    """How per-example gradients are clipped: auto picks the fastest exact mode for the model (dptrain's book-keeping
    kernels where they cover every layer, else Opacus ghost clipping, else hooks); the others force one. The
    guarantee is the same in every mode."""
    eval_fraction: Annotated[float, Field(ge=0, lt=1)] | None = None
    """Share of the records held out for evaluation (never trained on), 0.2 when unset. A record is held out by a
    keyed hash of its own content, so adding or removing one record moves no other. With a datasetRef the holdout
    is the PrivateDataset's (spec.holdoutFraction): leave this unset or equal to it."""
    eval_releases: Annotated[int, Field(ge=0, le=100)] = 4
    """How many times held-out metrics (accuracy, loss, AUC) are released, with Gaussian noise paid from the
    holdout's own privacy budget (evenly spaced; the last at the end). 0: none are released."""
    seed: Annotated[int, Field(ge=0)] | None = None
    """Random seed for the initial weights. The split, the noise and the sampling never depend on it."""


class ResourcesSpec(ApiModel):
    """Compute for each trainer pod."""

    cpu: Quantity = "1"
    """CPU request and limit. The trainer uses exactly this many threads (oversubscription is very slow)."""
    memory: Quantity = "2Gi"
    """Memory request and limit."""
    gpus: Annotated[int, Field(ge=0, le=16)] = 0
    """NVIDIA GPUs (nvidia.com/gpu limit)."""
    node_selector: dict[str, str] = Field(default={})
    """Node labels the trainer pod must match."""
    tolerations: list[Toleration] = Field(default=[])
    """Taints the trainer pod tolerates."""
    priority_class_name: str | None = None
    """PriorityClass of the trainer pod."""


class CheckpointSpec(ApiModel):
    """Where checkpoints and the write-ahead privacy journal live."""

    volume: Literal["persistentVolumeClaim", "emptyDir"] = "persistentVolumeClaim"
    """persistentVolumeClaim survives pod restarts (resume, and crashed steps stay charged). emptyDir does not."""
    size: Quantity = "1Gi"
    """Size of the claim."""
    storage_class_name: str | None = None
    """StorageClass of the claim; the cluster default when empty."""
    every_steps: Annotated[int, Field(ge=1, le=100000)] = 50
    """Steps between checkpoints. The journal charges a whole chunk before it runs."""


class RunPolicy(ApiModel):
    """Retries, deadlines, clean-up and suspension (Kueue-compatible)."""

    backoff_limit: Annotated[int, Field(ge=0, le=100)] = 3
    """Retries after a trainer pod fails; each retry resumes from the last checkpoint."""
    active_deadline_seconds: Annotated[int, Field(ge=1)] | None = None
    """Fail the job (DeadlineExceeded) after this long running."""
    ttl_seconds_after_finished: Annotated[int, Field(ge=0)] | None = None
    """Delete the finished DPTrainingJob this long after it succeeds or fails."""
    suspend: bool = False
    """true deletes the trainer pod and keeps the checkpoint; false resumes."""


class DistributedSpec(ApiModel):
    """Data-parallel DP-SGD across several pods (torch.distributed). Immutable after creation."""

    workers: Annotated[int, Field(ge=1, le=64)] = 1
    """Pods in the gang. Each runs max(resources.gpus, 1) processes; batchSize stays the GLOBAL expected batch, and
    the noise is added once per global step, so the guarantee is the same as one process's."""


class AuditSpec(ApiModel):
    """An empirical privacy audit after training (Steinke, Nasr & Jagielski 2023, one training run): the job's own
    DP-SGD pipeline runs once more with canaries on public or synthetic stand-in data (never the PrivateDataset's
    records, never charged), and the share of canaries guessed right gives a lower bound on ε. A bound above the
    claimed ε means the pipeline is not as private as claimed; a bound below it proves nothing more."""

    canaries: Annotated[int, Field(ge=10, le=100000)] = 1000
    """Canaries of each kind; each is included with probability 1/2. More canaries can reveal a larger ε (at most
    about ln(canaries)) and take longer."""
    kind: Literal["gradient", "input", "poisoned", "both", "all"] = "both"
    """gradient: white-box canaries whose clipped gradient is a fixed direction, noised by the job's own DP optimizer
    (the strongest audit); input: random out-of-distribution records trained through the job's clipping and scored
    by their loss (weak on small models); poisoned: adversarial records (corners of the feature box, the least likely
    label) that check no record dominates; both: gradient and input; all: the three."""
    confidence: Annotated[float, Field(ge=0.5, lt=1)] = 0.95
    """Confidence of the lower bound: the chance that it is not above the true ε."""


SECURE_NOISE_RULE = "privacy.secureNoise: false is for public built-in data only (the noise must come from a CSPRNG)"


class DPTrainingJobSpec(ApiModel):
    """What to train, with which privacy guarantee, on which resources."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                kubernetes_rule(
                    "!has(self.dataset.datasetRef) || self.privacy.secureNoise",
                    SECURE_NOISE_RULE,
                    field_path=".privacy.secureNoise",
                )
            ]
        }
    )

    dataset: Annotated[DatasetSpec, Field(json_schema_extra={"x-kubernetes-validations": IMMUTABLE})]
    """The data to train on (immutable)."""
    model: Annotated[ModelSpec, Field(json_schema_extra={"x-kubernetes-validations": IMMUTABLE})] = ModelSpec()
    """The network to train (immutable)."""
    privacy: Annotated[PrivacySpec, Field(json_schema_extra={"x-kubernetes-validations": IMMUTABLE})]
    """The (ε, δ) guarantee and DP-SGD parameters (immutable)."""
    training: Annotated[TrainingSpec, Field(json_schema_extra={"x-kubernetes-validations": IMMUTABLE})] = TrainingSpec()
    """Epochs, batch sizes, optimizer (immutable)."""
    distributed: Annotated[DistributedSpec, Field(json_schema_extra={"x-kubernetes-validations": IMMUTABLE})] = (
        DistributedSpec()
    )
    """How many pods train together (immutable)."""
    resources: ResourcesSpec = ResourcesSpec()
    """CPU, memory, GPUs and placement of each trainer pod."""
    checkpoint: CheckpointSpec = CheckpointSpec()
    """Checkpoint and privacy-journal storage."""
    image: Annotated[str, Field(min_length=1)] | None = None
    """Trainer image override; the operator's default otherwise."""
    run_policy: RunPolicy = RunPolicy()
    """Retries, deadline, TTL and suspension."""
    audit: AuditSpec | None = None
    """Audit the job's privacy empirically after training (audit-report.json in the checkpoint volume, the
    dptrain_audit_epsilon_lower_bound metric, status.audit). Unset: no audit."""

    @model_validator(mode="after")
    def _secure_noise_on_private_data(self) -> DPTrainingJobSpec:
        if self.dataset.dataset_ref is not None and not self.privacy.secure_noise:
            raise ValueError(SECURE_NOISE_RULE)
        return self


class PrivacyStatus(ApiModel):
    """The privacy spent so far, a valid upper bound for every step that ran (crashed attempts included)."""

    epsilon_spent: float | None = None
    """ε spent so far at delta, by the job's accountant."""
    target_epsilon: float | None = None
    """The job's ε budget."""
    delta: float | None = None
    """δ of the guarantee."""
    noise_multiplier: float | None = None
    """σ: Gaussian noise standard deviation relative to maxGradNorm."""
    sample_rate: float | None = None
    """Poisson sampling rate q = batchSize / training examples."""
    steps: int | None = None
    """Steps charged so far."""
    planned_steps: int | None = None
    """Steps in the plan."""
    accountant: Accountant | None = None
    """Accountant that computed epsilonSpent."""


class ProgressStatus(ApiModel):
    """Training progress, refreshed from the trainer's metrics while it runs."""

    step: int | None = None
    """Steps completed."""
    total_steps: int | None = None
    """Steps in the plan."""
    epoch: float | None = None
    """Epochs completed (fractional)."""
    loss: float | None = None
    """Latest held-out loss, released with differential privacy (clipped cross-entropy, Gaussian noise)."""
    eval_metric: str | None = None
    """Name of the evaluation metric (accuracy or auc)."""
    eval_value: float | None = None
    """Latest held-out evaluation metric, released with differential privacy (Gaussian noise)."""
    percent: str | None = None
    """Progress as a percentage string, for kubectl get."""
    last_update_time: datetime | None = None
    """When progress was last refreshed."""


class AuditStatus(ApiModel):
    """The empirical privacy audit's result (spec.audit), from the trainer."""

    epsilon_lower_bound: float | None = None
    """ε̂: with the stated confidence, the job's pipeline is not (ε, δ)-DP for any ε below it."""
    epsilon: float | None = None
    """The ε the audit was compared with: the job's DP-SGD steps at delta (what it claims for a training record)."""
    confidence: float | None = None
    """Confidence of the lower bound."""
    contradicted: bool | None = None
    """true when epsilonLowerBound > epsilon: the pipeline is NOT as private as claimed."""


class WorkerStatus(ApiModel):
    """One pod of the current attempt's gang."""

    index: int
    """Node rank (0: the leader, which owns the journal and the checkpoint)."""
    pod: str
    """Pod name."""
    phase: str | None = None
    """The pod's phase (Pending, Running, Succeeded, Failed), None while it is not created yet."""


class DistributedStatus(ApiModel):
    """The gang of a multi-worker job (spec.distributed.workers > 1)."""

    world_size: int
    """Processes in torch.distributed's world: workers × processes per pod."""
    ready: str
    """Running pods of the current attempt, as "running/workers"."""
    workers: list[WorkerStatus] = Field(default_factory=list)
    """Each pod of the current attempt."""


class DPTrainingJobStatus(ApiModel):
    """Observed state, written by the operator."""

    phase: JobPhase | None = None
    """Pending, Running, Succeeded, Failed or Suspended."""
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    """Standard conditions (Admitted, Running, Succeeded, Failed, Suspended)."""
    privacy: PrivacyStatus | None = None
    """Privacy spent so far."""
    progress: ProgressStatus | None = None
    """Training progress."""
    audit: AuditStatus | None = None
    """The empirical privacy audit's result, when spec.audit asked for one."""
    attempts: int | None = None
    """Attempts started so far (1 + retries); an attempt of a multi-worker job is one gang of pods."""
    distributed: DistributedStatus | None = None
    """World size and per-pod readiness of a multi-worker job."""
    ledger_name: str | None = None
    """The cluster-scoped PrivacyLedger that keeps this job's charge (its trusted record: what this status shows
    about attempts and ε is copied from there and from the trainer, never read back)."""
    start_time: datetime | None = None
    """When the first trainer pod was created."""
    completion_time: datetime | None = None
    """When the job succeeded or failed."""
    observed_generation: int | None = None
    """The .metadata.generation last reconciled."""


class DPTrainingJob(ApiModel):
    """A differentially private training job: DP-SGD on sensitive data with an (ε, δ) guarantee."""

    KIND: ClassVar[str] = "DPTrainingJob"

    api_version: Literal["dptrain.io/v1alpha1"] = GROUP_VERSION  # type: ignore[assignment]
    kind: Literal["DPTrainingJob"] = "DPTrainingJob"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: DPTrainingJobSpec
    status: DPTrainingJobStatus | None = None
