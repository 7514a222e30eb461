"""The ServerApp of a federation (Flower's message API): Flower's FedAvg, weighted by PUBLIC declared sizes only.

Per round (``Strategy.start`` drives it): every connected site gets the global model; FedAvg averages the updates of
the replies that count (one per site, the site decided by SuperNode authentication when it is on), each weighted by
the coordinator's public size for the site (``sites[].declaredSize``) or, when unset, the public size the site
declares (its PrivateDataset's numExamples) — never a count of data. A round with fewer than ``minSites`` valid
updates fails the federation (plain FedAvg would silently keep the old model). After every round the global model is
checkpointed (``global-round-NNNN.pt``, ``latest.pt``) with ``status.json``; a restarted coordinator resumes from
there. The DP held-out sums the sites release about a global model are added up into the global model's DP metric.
After the last round each site receives the final model (``query.finish``), then ``query.close`` (its SuperNode may
stop); on a permanent failure, ``query.abort``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from dptrain.evaluation import metrics_from_sums
from dptrain.federated.config import RUN_CONFIG_KEY, ServerConfig
from dptrain.federated.protocol import (
    ARRAYS,
    CONFIG,
    FINGERPRINT,
    METRICS,
    RELEASE,
    ROUND,
    SITE,
    SITE_ID,
    SUMS,
    WEIGHT,
    identify,
    release_after_round,
)
from dptrain.journal import atomic_write

__all__ = [
    "FINAL_MODEL_NAME",
    "LATEST_NAME",
    "STATUS_NAME",
    "FederationStatus",
    "SiteProgress",
    "app",
    "initial_state",
    "load_state",
    "save_state",
]

logger = logging.getLogger("dptrain.federated.server")

STATUS_NAME: Final = "status.json"
LATEST_NAME: Final = "latest.pt"
FINAL_MODEL_NAME: Final = "global-model.pt"


class RoundFailedError(RuntimeError):
    """A round had fewer valid site updates than minSites: the federation fails (it does not keep the old model)."""


@dataclass
class SiteProgress:
    """What the coordinator knows about a site: public numbers the site reported, and what the strategy did."""

    epsilon: float | None = None
    charged_steps: int | None = None
    charged_releases: int | None = None
    planned_steps: int | None = None
    target_epsilon: float | None = None
    declared_size: int | None = None
    weight: float | None = None
    rounds: list[int] = field(default_factory=list)
    """Rounds whose update from this site was aggregated."""
    last_error: str | None = None


@dataclass
class FederationStatus:
    """``status.json`` in the coordinator's output folder (the supervisor's metrics and report read it)."""

    state: str = "running"
    """running, succeeded, failed, stopped."""
    completed_round: int = 0
    total_rounds: int = 0
    min_sites: int = 0
    sites: dict[str, SiteProgress] = field(default_factory=dict)
    global_metric: dict[str, Any] = field(default_factory=dict)
    """The latest DP metric of the global model: {round, accuracy, loss, auc?, sites}."""
    metric_history: list[dict[str, Any]] = field(default_factory=list)
    round_seconds: list[float] = field(default_factory=list)
    error: str | None = None
    updated: float = 0.0

    def write(self, out_dir: Path) -> None:
        self.updated = time.time()
        atomic_write(out_dir / STATUS_NAME, (json.dumps(asdict(self), indent=1, allow_nan=False) + "\n").encode())

    @classmethod
    def read(cls, out_dir: Path) -> FederationStatus | None:
        try:
            raw = json.loads((out_dir / STATUS_NAME).read_text())
        except (OSError, ValueError):
            return None
        sites = {name: SiteProgress(**values) for name, values in (raw.pop("sites", None) or {}).items()}
        known = {key: value for key, value in raw.items() if key in cls.__dataclass_fields__}
        return cls(**known, sites=sites)


# --- the global model ------------------------------------------------------------------------------------------


def initial_state(config: ServerConfig) -> dict[str, torch.Tensor]:
    """The initial global model: the federation's architecture with weights from its seed (public: no data)."""
    from dptrain.models import build_model

    spec = config.federation.spec
    seed = spec.training.seed
    if seed is None:
        seed = int(hashlib.sha256(config.fingerprint.encode()).hexdigest()[:15], 16)
    torch.manual_seed(seed)
    model, _ = build_model(spec.model, input_shape=tuple(spec.data.input_shape), num_classes=spec.data.num_classes)
    return {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}


def save_state(path: Path, state: dict[str, torch.Tensor]) -> None:
    buffer = io.BytesIO()
    torch.save({key: value.detach().cpu() for key, value in state.items()}, buffer)
    atomic_write(path, buffer.getvalue())


def load_state(path: Path) -> dict[str, torch.Tensor]:
    loaded: dict[str, torch.Tensor] = torch.load(path, map_location="cpu", weights_only=True)
    return loaded


# --- the strategy ----------------------------------------------------------------------------------------------


class PublicWeightFedAvg(FedAvg):
    """Flower's FedAvg whose weights are public declared sizes, one update per site, at least minSites a round."""

    def __init__(self, *, config: ServerConfig, status: FederationStatus, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config = config
        self.status = status
        spec = config.federation.spec
        self.table = config.declared_sizes()
        self.known = {site.name for site in spec.sites}
        self.require_registered = spec.superlink.node_authentication
        self.releases = release_after_round(spec.training.rounds, spec.training.eval_releases)
        self.node_names: dict[int, str] = {}
        self.round_started = time.monotonic()

    def global_round(self, server_round: int) -> int:
        return self.config.initial_round + server_round

    def refresh_names(self, grid: Grid) -> None:
        """With SuperNode authentication, the name registered for each node's key (not what the node says)."""
        try:
            self.node_names = {int(node.node_id): str(node.name) for node in grid.get_nodes() if node.name}
        except Exception as error:  # older SuperLinks: fall back to the reported names (auth off only)
            logger.warning("cannot read the registered node names: %s", error)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        number = self.global_round(server_round)
        spec = self.config.federation.spec
        wait_for_min_sites(grid, spec.min_sites, timeout=spec.training.round_timeout_seconds, what=f"round {number}")
        self.refresh_names(grid)
        self.round_started = time.monotonic()
        config[ROUND] = number
        config[RELEASE] = (number - 1) in self.releases
        config[FINGERPRINT] = self.config.fingerprint
        return super().configure_train(server_round, arrays, config, grid)

    def _weighted(self, number: int, replies: Iterable[Message]) -> tuple[list[Message], list[Any]]:
        """The replies that count (their weight set from the public table), and the DP sums they released."""
        kept: list[Message] = []
        sums: list[Any] = []
        seen: set[str] = set()
        for message in replies:
            node = int(message.metadata.src_node_id)
            if message.has_error():
                name = self.node_names.get(node)
                if name in self.status.sites:
                    self.status.sites[name].last_error = str(message.error.reason)[:500]
                continue
            site_record = message.content[SITE] if SITE in message.content else ConfigRecord()
            assert isinstance(site_record, ConfigRecord)
            identity = identify(
                registered=self.node_names.get(node),
                reported=str(site_record.get(SITE_ID, "")),
                known=dict.fromkeys(self.known),
                require_registered=self.require_registered,
            )
            if identity.site is None or identity.site in seen:
                logger.warning(
                    "round %d: dropping a reply from node %d: %s",
                    number,
                    node,
                    identity.reason or "a second reply for the same site",
                )
                continue
            seen.add(identity.site)
            metrics = message.content[METRICS]
            assert isinstance(metrics, MetricRecord)
            declared = int(float(str(metrics.get("declared-size", 0))))
            weight = float(self.table.get(identity.site, declared))
            if weight <= 0:
                logger.warning(
                    "round %d: site %s declares no public size; its update is left out", number, identity.site
                )
                continue
            metrics[WEIGHT] = weight
            progress = self.status.sites.setdefault(identity.site, SiteProgress())
            progress.epsilon = float(str(metrics.get("epsilon", 0.0)))
            progress.charged_steps = int(float(str(metrics.get("charged-steps", 0))))
            progress.charged_releases = int(float(str(metrics.get("charged-releases", 0))))
            progress.planned_steps = int(float(str(metrics.get("planned-steps", 0))))
            progress.target_epsilon = float(str(metrics.get("target-epsilon", 0.0)))
            progress.declared_size, progress.weight, progress.last_error = declared, weight, None
            if ARRAYS in message.content:
                progress.rounds = sorted({*progress.rounds, number})
            if SUMS in metrics:
                sums.append(metrics.pop(SUMS))
            kept.append(message)
        return kept, sums

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        number = self.global_round(server_round)
        replies = list(replies)
        kept, sums = self._weighted(number, replies)
        errors = len(replies) - len([message for message in replies if not message.has_error()])
        logger.info("round %d: %d site update(s) count, %d failure(s)", number, len(kept), errors)
        if len(kept) < self.min_train_nodes:
            raise RoundFailedError(
                f"round {number}: {len(kept)} valid site update(s), fewer than minSites={self.min_train_nodes}"
            )
        if sums:
            self.record_metric(number - 1, sums)
        arrays, metrics = super().aggregate_train(server_round, kept)
        self.status.round_seconds.append(round(time.monotonic() - self.round_started, 3))
        return arrays, metrics

    def record_metric(self, model_round: int, sums: list[Any]) -> None:
        """Add the sites' DP releases about the global model of ``model_round`` into its DP metric."""
        total = torch.tensor(sums[0], dtype=torch.float64)
        for other in sums[1:]:
            total = total + torch.tensor(other, dtype=torch.float64)
        spec = self.config.federation.spec
        metrics = metrics_from_sums(total, num_classes=spec.data.num_classes)
        entry = {"round": model_round, "sites": len(sums), **metrics}
        self.status.global_metric = entry
        self.status.metric_history.append(entry)


def _count_sites(contents: list[RecordDict], _: str) -> MetricRecord:
    """FedAvg's metric aggregation: only how many sites counted (per-site numbers are in status.json)."""
    return MetricRecord({"sites": len(contents)})


# --- the app ---------------------------------------------------------------------------------------------------

app = ServerApp()


def _wait_for_sites(grid: Grid, config: ServerConfig) -> None:
    """Round 1 waits (up to the join timeout) until every expected site is connected, then starts with those there:
    at least minSites, for which it waits up to the round timeout more."""
    spec = config.federation.spec
    expected = len(config.expected_sites) or len(spec.sites)
    deadline = time.monotonic() + config.join_timeout_seconds
    while time.monotonic() < deadline:
        connected = len(list(grid.get_node_ids()))
        if connected >= expected:
            return
        time.sleep(1.0)
    logger.warning(
        "not every expected site joined within %.0fs; starting with those connected", config.join_timeout_seconds
    )
    wait_for_min_sites(grid, spec.min_sites, timeout=spec.training.round_timeout_seconds, what="round 1")


def wait_for_min_sites(grid: Grid, minimum: int, *, timeout: float, what: str, poll: float = 1.0) -> None:
    """Wait until ``minimum`` sites are connected, for ``timeout`` seconds at most. Flower's own sampling waits for
    them without a bound: a federation that can no longer gather minSites (a site that crashed for good) would hang
    instead of failing with a reason."""
    deadline = time.monotonic() + timeout
    while (connected := len(list(grid.get_node_ids()))) < minimum:
        if time.monotonic() >= deadline:
            raise RoundFailedError(
                f"{what}: {connected} site(s) connected after waiting {timeout:.0f}s, fewer than minSites={minimum}"
            )
        time.sleep(poll)


def _broadcast(grid: Grid, message_type: str, content: RecordDict, *, timeout: float) -> list[Message]:
    messages = [Message(content=content, message_type=message_type, dst_node_id=node) for node in grid.get_node_ids()]
    return list(grid.send_and_receive(messages, timeout=timeout)) if messages else []


@app.main()
def main(grid: Grid, context: Context) -> None:  # noqa: PLR0915 - to split with the federated/ regroup by role (issue 24)
    config = ServerConfig.read(str(context.run_config[RUN_CONFIG_KEY]))
    spec = config.federation.spec
    out_dir = config.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    status = FederationStatus.read(out_dir) or FederationStatus()
    status.state, status.error = "running", None
    status.total_rounds, status.min_sites = spec.training.rounds, spec.min_sites
    status.completed_round = config.initial_round
    for site in spec.sites:
        status.sites.setdefault(site.name, SiteProgress())
    status.write(out_dir)
    state = load_state(config.resume_from) if config.resume_from is not None else initial_state(config)
    strategy = PublicWeightFedAvg(
        config=config,
        status=status,
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=spec.min_sites,
        min_evaluate_nodes=0,
        min_available_nodes=spec.min_sites,
        weighted_by_key=WEIGHT,
        arrayrecord_key=ARRAYS,
        configrecord_key=CONFIG,
        train_metrics_aggr_fn=_count_sites,
    )

    def checkpoint(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        number = config.initial_round + server_round
        model = arrays.to_torch_state_dict()
        save_state(out_dir / f"global-round-{number:04d}.pt", model)
        save_state(out_dir / LATEST_NAME, model)
        status.completed_round = number
        status.write(out_dir)
        logger.info("round %d aggregated and checkpointed", number)
        return None

    timeout = spec.training.round_timeout_seconds
    try:
        _wait_for_sites(grid, config)
        rounds_left = spec.training.rounds - config.initial_round
        final = ArrayRecord(state)
        if rounds_left > 0 and spec.secure_aggregation is not None:
            from dptrain.federated.secagg import run_secure

            final = run_secure(grid, context, config, state, status)
        elif rounds_left > 0:
            result = strategy.start(
                grid=grid,
                initial_arrays=final,
                num_rounds=rounds_left,
                timeout=timeout,
                evaluate_fn=checkpoint,
            )
            final = result.arrays
        final_state = final.to_torch_state_dict()
        save_state(out_dir / FINAL_MODEL_NAME, final_state)
        strategy.refresh_names(grid)
        last = spec.training.rounds
        content = RecordDict(
            {
                ARRAYS: final,
                CONFIG: ConfigRecord(
                    {ROUND: last, RELEASE: last in strategy.releases, FINGERPRINT: config.fingerprint}
                ),
            }
        )
        replies = _broadcast(grid, "query.finish", content, timeout=timeout)
        kept, sums = strategy._weighted(last + 1, replies)
        if sums:
            strategy.record_metric(last, sums)
        logger.info("the final model went to %d site(s)", len(kept))
        status.state = "succeeded"
        status.write(out_dir)
        # Only now may the sites stop: a SuperNode stopped before its finish reply left would lose it.
        _broadcast(grid, "query.close", RecordDict({CONFIG: ConfigRecord({ROUND: last})}), timeout=min(timeout, 60.0))
    except SystemExit:  # `flwr stop`: the supervisor may resume from the last checkpoint
        status.state = "stopped"
        status.write(out_dir)
        raise
    except BaseException as error:
        status.state, status.error = "failed", f"{type(error).__name__}: {error}"[:2000]
        status.write(out_dir)
        try:
            reason = ConfigRecord({"reason": f"the coordinator failed: {status.error}"})
            _broadcast(grid, "query.abort", RecordDict({CONFIG: reason}), timeout=min(timeout, 60.0))
        except Exception as abort_error:  # best effort: the sites also stop on their own deadline or when told
            logger.warning("cannot tell the sites the federation failed: %s", abort_error)
        raise
