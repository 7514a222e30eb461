"""The message protocol between the ServerApp and the sites' ClientApps (record keys), and the pure rules both
sides apply: which rounds release the global model's metric, which site a reply speaks for, and its FedAvg weight.
No Flower import: the rules are unit-tested on their own."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from dptrain.errors import (
    ConfigurationError,
    DataError,
    IncomingModelError,
    JournalError,
    ModelError,
    PlanMismatchError,
    PrivacyBudgetError,
)
from dptrain.evaluation import release_schedule

__all__ = [
    "ARRAYS",
    "CONFIG",
    "FINGERPRINT",
    "METRICS",
    "RELEASE",
    "RELEASED",
    "ROUND",
    "SITE",
    "SITE_ID",
    "SUMS",
    "WEIGHT",
    "ReplyIdentity",
    "SiteRefusal",
    "identify",
    "refusal",
    "release_after_round",
]

ARRAYS: Final = "arrays"
CONFIG: Final = "config"
METRICS: Final = "metrics"
SITE: Final = "site"
SITE_ID: Final = "site-id"
ROUND: Final = "dptrain-round"
"""The global round number (a resumed federation continues the count)."""
RELEASE: Final = "dptrain-release"
"""1: release the DP held-out sums of the global model this message carries (before training on it)."""
FINGERPRINT: Final = "dptrain-fingerprint"
"""sha256 of the agreed settings (dptrain_api.federation_fingerprint): a site with other settings refuses."""
WEIGHT: Final = "dptrain-weight"
"""FedAvg's weight key: the site's PUBLIC declared size (the coordinator's table wins over what a site says)."""
RELEASED: Final = "dptrain-released"
SUMS: Final = "dptrain-holdout-sums"
"""The DP release (Gaussian-noised held-out sums); summed over the sites, it measures the global model."""


def release_after_round(rounds: int, releases: int) -> frozenset[int]:
    """The rounds k whose resulting global model the sites measure (a DP release each): evenly spaced, the last at
    the final model. The model after round k < rounds is measured in round k+1's train message, the final one in
    the finish message."""
    return frozenset(release_schedule(steps=rounds, releases=min(releases, rounds)))


@dataclass(frozen=True)
class ReplyIdentity:
    site: str | None
    """The site the reply counts for; None when it must be dropped."""
    reason: str = ""


def identify(
    *, registered: str | None, reported: str, known: Mapping[str, object], require_registered: bool
) -> ReplyIdentity:
    """Which site a reply speaks for. With SuperNode authentication the name the SuperLink registered for the node's
    key decides (a reply claiming another site is dropped); without it, the site-id the node reports."""
    if require_registered and not registered:
        return ReplyIdentity(None, "the node has no registered name (SuperNode authentication is on)")
    if registered and registered != reported:
        return ReplyIdentity(None, f"the node registered as {registered!r} reports site {reported!r}")
    site = registered or reported
    if site not in known:
        return ReplyIdentity(None, f"{site!r} is not a site of this federation")
    return ReplyIdentity(site)


class SiteRefusal(Exception):  # noqa: N818 - what the coordinator is told, not a bug
    """What a site's ClientApp raises instead of its own error: Flower sends ``str(exception)`` to the coordinator
    (an untrusted peer), so only a fixed reason and sentence leave the site. The detail stays in the site's log."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"{reason}: {REFUSALS[reason]}")
        self.reason = reason


REFUSALS: Final[dict[str, str]] = {
    "PlanMismatch": "the coordinator's settings are not this site's, or the plan is not what was reserved; "
    "nothing was charged",
    "GlobalModelRefused": "the global model does not fit this site's model or is not finite; nothing was charged",
    "BudgetSpent": "every step this site planned is charged",
    "JournalLost": "this site's privacy journal cannot be used; nothing more may run",
    "SiteUnusable": "this site cannot train (its data, model or configuration); its own status says why",
    "SiteError": "the site failed; its own log has the details",
}
"""Every sentence a site may say about why it did not answer."""

_REFUSAL_OF: Final[tuple[tuple[type[Exception], str], ...]] = (
    (PlanMismatchError, "PlanMismatch"),
    (IncomingModelError, "GlobalModelRefused"),
    (PrivacyBudgetError, "BudgetSpent"),
    (JournalError, "JournalLost"),
    (DataError, "SiteUnusable"),
    (ModelError, "SiteUnusable"),
    (ConfigurationError, "SiteUnusable"),
)


def refusal(error: Exception) -> SiteRefusal:
    """The fixed refusal that stands for ``error`` (most specific class first)."""
    if isinstance(error, SiteRefusal):
        return error
    return SiteRefusal(next((reason for kind, reason in _REFUSAL_OF if isinstance(error, kind)), "SiteError"))
