"""The ClientApp every site's SuperNode runs (Flower's message API): one process per message, next to the data.

Messages (from :mod:`dptrain.federated.server_app`):

* ``train`` — the global model and ``{dptrain-round, dptrain-release, dptrain-fingerprint}``: the site runs one
  round of DP-SGD from it (:meth:`SiteRuntime.train_round`) and answers its model, its public numbers and, when asked,
  the DP release of the global model's held-out sums.
* ``query.finish`` — the final global model: the site keeps it and releases its held-out sums if asked;
* ``query.close`` — the coordinator has every final reply: the site's supervisor stops the SuperNode.
* ``query.abort`` — the coordinator gave up: the site records it and its supervisor stops.

The site's plan (σ, q, steps) and data come from the file its own supervisor wrote (``--node-config
dptrain-site-config=...``); the run config from the coordinator carries nothing a site trusts.
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from dptrain.federated.config import NODE_CONFIG_KEY, SiteConfig
from dptrain.federated.protocol import (
    ARRAYS,
    CONFIG,
    FINGERPRINT,
    METRICS,
    RELEASE,
    RELEASED,
    ROUND,
    SITE,
    SITE_ID,
    SUMS,
    WEIGHT,
    refusal,
)
from dptrain.federated.site import RoundResult, SiteRuntime
from dptrain.runtime import configure_threads

__all__ = ["app"]

logger = logging.getLogger("dptrain.federated.client")


class _SiteClientApp(ClientApp):
    """The message-API ClientApp, which also answers Flower's SecAgg+ rounds: their train messages carry the SecAgg+
    stage configuration and go through ``secaggplus_mod`` to the same site runtime (:mod:`dptrain.federated.secagg`)."""

    def __call__(self, message: Message, context: Context) -> Message:
        from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

        if message.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in message.content.config_records:
            from flwr.client.message_handler.message_handler import handle_legacy_message_from_msgtype
            from flwr.client.mod import secaggplus_mod

            from dptrain.federated.secagg import secagg_client_fn

            def legacy(inner: Message, inner_context: Context) -> Message:
                return handle_legacy_message_from_msgtype(secagg_client_fn, inner, inner_context)

            try:
                reply: Message = secaggplus_mod(message, context, legacy)
            except Exception as error:  # the site's own errors are already refusals (SecAggSiteClient.fit)
                raise refusal(error) from None
            return reply
        return super().__call__(message, context)


app = _SiteClientApp()


def _runtime(context: Context) -> SiteRuntime:
    path = context.node_config.get(NODE_CONFIG_KEY)
    if not isinstance(path, str) or not path:
        raise RuntimeError(f"this SuperNode has no --node-config {NODE_CONFIG_KEY}=...: it is not a dptrain site")
    configure_threads()
    return SiteRuntime(SiteConfig.read(path))


def _config(message: Message) -> tuple[int, bool, str]:
    config = message.content[CONFIG] if CONFIG in message.content else ConfigRecord()
    assert isinstance(config, ConfigRecord)
    return int(str(config.get(ROUND, 0))), bool(config.get(RELEASE, False)), str(config.get(FINGERPRINT, ""))


def _reply(message: Message, site: SiteRuntime, result: RoundResult, *, round_number: int) -> Message:
    metrics: dict[str, Any] = dict(result.metrics)
    metrics[WEIGHT] = float(site.config.declared_size)  # the coordinator replaces it with its own public table
    metrics[RELEASED] = 1.0 if result.sums is not None else 0.0
    if result.sums is not None:
        metrics[SUMS] = [float(value) for value in result.sums.tolist()]
    content = RecordDict(
        {
            METRICS: MetricRecord(metrics),
            SITE: ConfigRecord({SITE_ID: site.config.name, ROUND: round_number}),
        }
    )
    if result.state is not None:
        content[ARRAYS] = ArrayRecord(result.state)
    return Message(content=content, reply_to=message)


def _guarded(message: Message, context: Context, work: Any) -> Message:
    """Run ``work(site)``; any error goes back as a fixed refusal only (:meth:`SiteRuntime.refusal`)."""
    try:
        site = _runtime(context)
    except Exception as error:
        logger.error("this site cannot start a round: %s: %s", type(error).__name__, error)
        raise refusal(error) from None
    try:
        reply: Message = work(site)
        return reply
    except Exception as error:
        raise site.refusal(error, str(message.metadata.message_type)) from None


@app.train()
def train(message: Message, context: Context) -> Message:
    round_number, release, fingerprint = _config(message)
    arrays = message.content[ARRAYS]
    assert isinstance(arrays, ArrayRecord)
    state = arrays.to_torch_state_dict()

    def work(site: SiteRuntime) -> Message:
        result = site.train_round(
            round_number=round_number, global_state=state, release=release, fingerprint=fingerprint
        )
        return _reply(message, site, result, round_number=round_number)

    return _guarded(message, context, work)


@app.query("finish")
def finish(message: Message, context: Context) -> Message:
    round_number, release, fingerprint = _config(message)
    arrays = message.content[ARRAYS]
    assert isinstance(arrays, ArrayRecord)
    state = arrays.to_torch_state_dict()

    def work(site: SiteRuntime) -> Message:
        result = site.finish(round_number=round_number, global_state=state, release=release, fingerprint=fingerprint)
        return _reply(message, site, result, round_number=round_number)

    return _guarded(message, context, work)


@app.query("close")
def close(message: Message, context: Context) -> Message:
    site = _runtime(context)
    site.close()
    return Message(content=RecordDict({SITE: ConfigRecord({SITE_ID: site.config.name})}), reply_to=message)


@app.query("abort")
def abort(message: Message, context: Context) -> Message:
    config = message.content[CONFIG] if CONFIG in message.content else ConfigRecord()
    assert isinstance(config, ConfigRecord)
    site = _runtime(context)
    site.abort(str(config.get("reason", "the coordinator aborted the federation")))
    return Message(
        content=RecordDict({SITE: ConfigRecord({SITE_ID: site.config.name})}),
        reply_to=message,
    )
