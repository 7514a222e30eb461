"""Pure builders: manifests of the objects a job runs as. No I/O, no cluster."""

from dptrain_operator.render.children import (
    JOB_FILE,
    TERMINATION_MESSAGE_PATH,
    TRAINER_CONTAINER,
    checkpoint_claim,
    job_config_map,
    trainer_pod,
)
from dptrain_operator.render.labels import (
    ATTEMPT_LABEL,
    JOB_NAME_LABEL,
    JOB_UID_LABEL,
    checkpoint_claim_name,
    config_map_name,
    job_labels,
    pod_name,
)

__all__ = [
    "ATTEMPT_LABEL",
    "JOB_FILE",
    "JOB_NAME_LABEL",
    "JOB_UID_LABEL",
    "TERMINATION_MESSAGE_PATH",
    "TRAINER_CONTAINER",
    "checkpoint_claim",
    "checkpoint_claim_name",
    "config_map_name",
    "job_config_map",
    "job_labels",
    "pod_name",
    "trainer_pod",
]
