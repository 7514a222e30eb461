"""Secure aggregation (``spec.secureAggregation``): Flower's SecAgg+ (Bell et al. 2020), which Flower 1.42 offers only
through its legacy workflow API (``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` with a legacy strategy on
the server, ``secaggplus_mod`` around a legacy client on each site).

The coordinator then learns only the weighted SUM of the sites' updates (each already a DP-SGD output, charged in its
site's journal exactly as without SecAgg+), plus what the sites report in the clear (public numbers, and the DP
held-out sums of the global model). Because the weights are masked with the updates, the coordinator must not choose
them (a weight of 2²⁰ on one site would single its update out of the "sum"): each site weights its own update by its
own PUBLIC declared size (its PrivateDataset's), and refuses a round whose weight table (``sites[].declaredSize``,
sent with every round) gives it another one. Every update counts for the site whose reply carried it; a reply from a
node that is not a site of the federation (or not the one its key was registered for) cannot be
taken out of the masked sum, so it fails the round instead.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context
from flwr.client import Client, NumPyClient
from flwr.common import FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import Grid, LegacyContext
from flwr.server import ServerConfig as LegacyServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

from dptrain.errors import PlanMismatchError
from dptrain.federated.config import NODE_CONFIG_KEY, ServerConfig, SiteConfig
from dptrain.federated.protocol import FINGERPRINT, RELEASE, ROUND, SITE_ID, SUMS, identify, release_after_round
from dptrain.federated.server_app import (
    LATEST_NAME,
    FederationStatus,
    PublicWeightFedAvg,
    RoundFailedError,
    SiteProgress,
    save_state,
    wait_for_min_sites,
)
from dptrain.federated.site import SiteRuntime

__all__ = ["SecAggSiteClient", "run_secure", "secagg_client_fn"]

logger = logging.getLogger("dptrain.federated.secagg")

KEYS = "dptrain-keys"
WEIGHTS = "dptrain-weights"


# --- a site ------------------------------------------------------------------------------------------------------


class SecAggSiteClient(NumPyClient):
    """The site's round as a legacy client: the same :class:`SiteRuntime` (engine, journal, replay, refusals)."""

    def __init__(self, context: Context) -> None:
        path = context.node_config.get(NODE_CONFIG_KEY)
        if not isinstance(path, str) or not path:
            raise RuntimeError(f"this SuperNode has no --node-config {NODE_CONFIG_KEY}=...: it is not a dptrain site")
        from dptrain.runtime import configure_threads

        configure_threads()
        self.site = SiteRuntime(SiteConfig.read(path))

    def fit(self, parameters: list[Any], config: dict[str, Scalar]) -> tuple[list[Any], int, dict[str, Scalar]]:
        try:
            return self._fit(parameters, config)
        except Exception as error:
            raise self.site.refusal(error, "a secure-aggregation round") from None

    def _fit(self, parameters: list[Any], config: dict[str, Scalar]) -> tuple[list[Any], int, dict[str, Scalar]]:
        weight = self._own_weight(config)
        keys = str(config[KEYS]).split(",")
        state = {key: torch.from_numpy(np.asarray(value)) for key, value in zip(keys, parameters, strict=True)}
        result = self.site.train_round(
            round_number=int(config[ROUND]),
            global_state=state,
            release=bool(config.get(RELEASE, False)),
            fingerprint=str(config[FINGERPRINT]),
        )
        assert result.state is not None
        metrics: dict[str, Scalar] = {key: float(value) for key, value in result.metrics.items()}
        metrics[SITE_ID] = self.site.config.name
        if result.sums is not None:
            metrics[SUMS] = json.dumps([float(value) for value in result.sums.tolist()])
        return [result.state[key].numpy() for key in keys], weight, metrics

    def _own_weight(self, config: dict[str, Scalar]) -> int:
        """The weight this site puts on its own update: its PUBLIC declared size, whatever the coordinator says.

        Inside SecAgg+ the weight is masked with the update, so the coordinator could not see a weight of 2²⁰ on one
        site and ~0 on the others, and would read that site's update off the "sum". A round whose table gives this
        site another weight is refused before anything is charged."""
        own = self.site.config.declared_size
        offered = json.loads(str(config.get(WEIGHTS, "{}"))).get(self.site.config.name)
        if offered is not None and int(offered) != own:
            raise PlanMismatchError(
                f"site {self.site.config.name}: the coordinator weights this site's update by {offered}, its public "
                f"declared size is {own}; refusing the round (nothing was charged)"
            )
        return own


def secagg_client_fn(context: Context) -> Client:
    return SecAggSiteClient(context).to_client()


# --- the coordinator ---------------------------------------------------------------------------------------------


class SecureFedAvg(LegacyFedAvg):
    """Flower's (legacy) FedAvg under SecAgg+: per-round checkpoints, minSites, the sites' public numbers."""

    def __init__(self, *, public: PublicWeightFedAvg, keys: list[str], out_dir: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.public = public
        self.keys = keys
        self.out_dir = out_dir

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[Any],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        number = self.public.global_round(server_round)
        status = self.public.status
        sums = []
        for proxy, fit in results:
            metrics = fit.metrics or {}
            identity = identify(
                registered=self.public.node_names.get(int(proxy.node_id)),
                reported=str(metrics.get(SITE_ID, "")),
                known=dict.fromkeys(self.public.known),
                require_registered=self.public.require_registered,
            )
            if identity.site is None:  # its update is inside the masked sum: the round cannot be trusted
                raise RoundFailedError(f"round {number}: a reply that is not a site's update ({identity.reason})")
            progress = status.sites.setdefault(identity.site, SiteProgress())
            progress.epsilon = float(metrics.get("epsilon", 0.0))
            progress.charged_steps = int(float(metrics.get("charged-steps", 0)))
            progress.charged_releases = int(float(metrics.get("charged-releases", 0)))
            progress.planned_steps = int(float(metrics.get("planned-steps", 0)))
            progress.target_epsilon = float(metrics.get("target-epsilon", 0.0))
            progress.declared_size = int(float(metrics.get("declared-size", 0)))
            progress.rounds = sorted({*progress.rounds, number})
            if SUMS in metrics:
                sums.append(json.loads(str(metrics[SUMS])))
        minimum = self.public.min_train_nodes
        if len(results) < minimum:
            raise RoundFailedError(f"round {number}: {len(results)} site update(s), fewer than minSites={minimum}")
        if sums:
            self.public.record_metric(number - 1, sums)
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        if parameters is not None:
            state = {
                key: torch.from_numpy(np.asarray(value))
                for key, value in zip(self.keys, parameters_to_ndarrays(parameters), strict=True)
            }
            save_state(self.out_dir / f"global-round-{number:04d}.pt", state)
            save_state(self.out_dir / LATEST_NAME, state)
            status.completed_round = number
            status.round_seconds.append(round(time.monotonic() - self.public.round_started, 3))
            status.write(self.out_dir)
        self.public.round_started = time.monotonic()
        return parameters, metrics


def _check_aggregated(status: FederationStatus, number: int) -> None:
    """Flower's SecAgg+ workflow ends a round it cannot finish (too few sites left to unmask) without an aggregate and
    goes on with the old model; here that fails the federation, before another round charges anything."""
    if status.completed_round < number:
        raise RoundFailedError(
            f"round {number}: secure aggregation ended without an aggregate (too few sites to unmask, or a site failed)"
        )


def run_secure(
    grid: Grid, context: Context, config: ServerConfig, state: dict[str, torch.Tensor], status: FederationStatus
) -> ArrayRecord:
    """The rounds under SecAgg+; the final global model."""
    spec = config.federation.spec
    secure = spec.secure_aggregation
    assert secure is not None
    public = PublicWeightFedAvg(config=config, status=status, min_train_nodes=spec.min_sites)
    public.refresh_names(grid)
    keys = list(state)
    weights = config.declared_sizes()
    releases = release_after_round(spec.training.rounds, spec.training.eval_releases)
    max_weight = float(max([*weights.values(), *(site.declared_size or 0 for site in spec.sites), 1]))

    def fit_config(server_round: int) -> dict[str, Scalar]:
        number = public.global_round(server_round)
        timeout = spec.training.round_timeout_seconds
        wait_for_min_sites(grid, spec.min_sites, timeout=timeout, what=f"round {number}")  # before Flower's sampling
        public.refresh_names(grid)
        _check_aggregated(status, number - 1)
        return {
            ROUND: number,
            RELEASE: (number - 1) in releases,
            FINGERPRINT: config.fingerprint,
            KEYS: ",".join(keys),
            WEIGHTS: json.dumps(weights),
        }

    strategy = SecureFedAvg(
        public=public,
        keys=keys,
        out_dir=config.out_dir,
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=spec.min_sites,
        min_evaluate_clients=0,
        min_available_clients=spec.min_sites,
        on_fit_config_fn=fit_config,
        initial_parameters=ndarrays_to_parameters([value.numpy() for value in state.values()]),
    )
    rounds_left = spec.training.rounds - config.initial_round
    legacy = LegacyContext(context=context, config=LegacyServerConfig(num_rounds=rounds_left), strategy=strategy)
    workflow = SecAggPlusWorkflow(
        num_shares=secure.num_shares,
        reconstruction_threshold=secure.reconstruction_threshold,
        # The declared sizes are public but may exceed the default; the sites' own sizes are not known here, so
        # the largest size the coordinator knows (or 2^20) bounds them.
        max_weight=max(max_weight, float(2**20)),
        clipping_range=secure.clipping_range,
        quantization_range=secure.quantization_range,
        timeout=spec.training.round_timeout_seconds,
    )
    public.round_started = time.monotonic()
    DefaultWorkflow(fit_workflow=workflow)(grid, legacy)
    _check_aggregated(status, spec.training.rounds)
    final = legacy.state.array_records.get("parameters")
    if isinstance(final, ArrayRecord):
        ndarrays = [value.numpy() for value in final.values()]
        return ArrayRecord({key: torch.from_numpy(np.asarray(v)) for key, v in zip(keys, ndarrays, strict=True)})
    return ArrayRecord(state)
