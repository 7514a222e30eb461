"""What every command shares: the logger, the program name in messages, the operator's attempt number."""

from __future__ import annotations

import logging
import os

from dptrain.errors import ConfigurationError
from dptrain_api import DistributedEnv, PodEnv

logger = logging.getLogger("dptrain")


def program() -> str:
    """``dptrain``, or ``dptrain[rank N]`` in a worker of a distributed run other than rank 0."""
    rank = os.environ.get(DistributedEnv.RANK, "0") if os.environ.get("TORCHELASTIC_RUN_ID") else "0"
    return "dptrain" if rank == "0" else f"dptrain[rank {rank}]"


def attempt_number() -> int:
    """The operator's attempt number (1 outside a pod): a retry must find the journal of the earlier attempts."""
    text = os.environ.get(PodEnv.ATTEMPT, "").strip()
    try:
        return int(text) if text else 1
    except ValueError:
        raise ConfigurationError(f"{PodEnv.ATTEMPT}={text!r} is not an attempt number") from None
