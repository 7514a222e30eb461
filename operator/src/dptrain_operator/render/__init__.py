"""Pure builders: manifests of the objects a job runs as. No I/O, no cluster."""

from dptrain_operator.render.children import (
    TERMINATION_MESSAGE_PATH,
    TRAINER_CONTAINER,
    TRAINER_FINALIZER,
    PodContract,
    checkpoint_claim,
    gang_network_policy,
    gang_service,
    job_manifest,
    trainer_pod,
)
from dptrain_operator.render.labels import (
    ATTEMPT_LABEL,
    JOB_NAME_LABEL,
    JOB_UID_LABEL,
    WORKER_LABEL,
    checkpoint_claim_name,
    child_name,
    gang_policy_name,
    gang_service_name,
    job_labels,
    owned_by,
    pod_name,
)

__all__ = [
    "ATTEMPT_LABEL",
    "JOB_NAME_LABEL",
    "JOB_UID_LABEL",
    "TERMINATION_MESSAGE_PATH",
    "TRAINER_CONTAINER",
    "TRAINER_FINALIZER",
    "WORKER_LABEL",
    "PodContract",
    "checkpoint_claim",
    "checkpoint_claim_name",
    "child_name",
    "gang_network_policy",
    "gang_policy_name",
    "gang_service",
    "gang_service_name",
    "job_labels",
    "job_manifest",
    "owned_by",
    "pod_name",
    "trainer_pod",
]
