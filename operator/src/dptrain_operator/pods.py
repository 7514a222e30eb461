"""Reading trainer pods: which are the job's own, which ended, whether their trainer ran, what they reported."""

from __future__ import annotations

from typing import Any, Final

from dptrain_api import TerminationMessage
from dptrain_operator.render import ATTEMPT_LABEL, JOB_UID_LABEL, WORKER_LABEL, owned_by
from dptrain_operator.scrape import exit_code, termination_message

Pod = dict[str, Any]

# Container states that mean the trainer process never started (so it cannot have written a journal).
_NEVER_RAN: Final = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ContainerCannotRun",
        "CreateContainerConfigError",
        "CreateContainerError",
        "StartError",
    }
)


def job_pods(kube: Any, namespace: str, uid: str) -> list[Pod]:
    """The job's trainer pods (labelled AND owned by it: a look-alike pod someone else made is ignored), by attempt
    number and worker index."""
    pods = [pod for pod in kube.list_pods(namespace, f"{JOB_UID_LABEL}={uid}") if owned_by(pod, uid)]
    return sorted(pods, key=lambda pod: (number(pod), worker(pod)))


def number(pod: Pod) -> int:
    """The attempt the pod belongs to."""
    return int(pod["metadata"].get("labels", {}).get(ATTEMPT_LABEL, "0"))


def worker(pod: Pod) -> int:
    """Its index in the attempt's gang (0: the leader, whose report is the charge)."""
    return int(pod["metadata"].get("labels", {}).get(WORKER_LABEL, "0"))


def phase(pod: Pod) -> str:
    return str(pod.get("status", {}).get("phase", "Pending"))


def ended(pod: Pod) -> bool:
    return phase(pod) in ("Succeeded", "Failed")


def terminating(pod: Pod) -> bool:
    """Deleted (it has a deletionTimestamp) but its containers have not ended yet."""
    return bool(pod["metadata"].get("deletionTimestamp")) and not ended(pod)


def trainer_ran(pod: Pod) -> bool:
    """Did the trainer process start? When in doubt, yes: a later pod then insists on finding its journal."""
    for container in pod.get("status", {}).get("containerStatuses", []) or []:
        state = container.get("state") or {}
        if "running" in state:
            return True
        terminated = state.get("terminated")
        if terminated and terminated.get("reason") not in _NEVER_RAN:
            return True
    return False


def oom_killed(pod: Pod) -> bool:
    """Did the kernel kill a container of the pod for memory (terminated reason OOMKilled)?"""
    for container in pod.get("status", {}).get("containerStatuses", []) or []:
        if ((container.get("state") or {}).get("terminated") or {}).get("reason") == "OOMKilled":
            return True
    return False


def report(pod: Pod) -> TerminationMessage | None:
    """What the trainer said when it ended (its termination message), if it said it in this contract."""
    return termination_message(pod)


def code(pod: Pod) -> int | None:
    return exit_code(pod)
