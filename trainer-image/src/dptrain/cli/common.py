"""What every command shares: the logger and the program name in messages."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from dptrain_api import (
    DistributedEnv,
)

if TYPE_CHECKING:
    pass


logger = logging.getLogger("dptrain")


def program() -> str:
    """``dptrain``, or ``dptrain[rank N]`` in a worker of a distributed run other than rank 0."""
    rank = os.environ.get(DistributedEnv.RANK, "0") if os.environ.get("TORCHELASTIC_RUN_ID") else "0"
    return "dptrain" if rank == "0" else f"dptrain[rank {rank}]"
