"""A site's side of a round: the existing DP-SGD engine (same clipping, write-ahead journal, checkpoint) run for one
round's local steps from the global model, on the site's own records. No Flower here: the ClientApp calls this.

Privacy invariants, each enforced here and not by the coordinator:

* The site's plan is its own: σ, q = batchSize / its declared training size, and rounds × localSteps steps come from
  its DPFederatedSite and PrivateDataset (and the mechanisms its operator reserved), never from the run config. A
  coordinator whose agreed settings differ (another fingerprint) is refused before anything is charged.
* Every round is charged in the site's privacy journal BEFORE its steps run (the engine's write-ahead chunk), so a
  site killed mid-round is charged for that round; the journal never charges more than the plan, so a site whose
  plan is spent refuses further rounds (:class:`PrivacyBudgetError`).
* What leaves the site: the model after its DP-SGD steps (a DP-SGD output), and, when the coordinator asks for the
  global model's metric, the Gaussian-noised held-out sums (charged to the holdout partition first). Nothing else
  computed from records: no loss, no count.
* A round the site already answered is answered again with the same saved update when the coordinator sends the
  same global model again (a coordinator resumed from its checkpoint): post-processing of an output already charged,
  so nothing is charged twice and nothing new is released.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import torch

from dptrain.checkpoint import export_model, job_fingerprint, unwrap_model
from dptrain.data import PreparedData, load_data
from dptrain.engine import TrainingRun
from dptrain.errors import DataError, IncomingModelError, PlanMismatchError, PrivacyBudgetError
from dptrain.evaluation import dp_release_sums
from dptrain.federated.config import SiteConfig, site_training_job
from dptrain.federated.protocol import SiteRefusal, refusal
from dptrain.journal import HOLDOUT, JOURNAL_NAME, TRAIN, PrivacyJournal, atomic_write, workdir_lock
from dptrain.models import state_problems
from dptrain.plan import SAMPLE_RATE_TOLERANCE, TrainingPlan, unit_column, unit_records
from dptrain_accounting import AccountingError, plan_fixed_steps
from dptrain_api import site_plan_inputs

__all__ = [
    "ABORTED_MARKER",
    "FINISHED_MARKER",
    "GLOBAL_MODEL_NAME",
    "SITE_STATUS_NAME",
    "RoundResult",
    "SiteRuntime",
    "SiteState",
    "initialise_journal",
    "site_plan",
    "state_hash",
]

logger = logging.getLogger(__name__)

UPDATES_DIR: Final = "federation-rounds"
FINISHED_MARKER: Final = "federation-finished.json"
ABORTED_MARKER: Final = "federation-aborted.json"
GLOBAL_MODEL_NAME: Final = "global-model.pt"
SITE_STATUS_NAME: Final = "federation-site.json"


def site_plan(config: SiteConfig) -> TrainingPlan:
    """The site's plan from public numbers: q = batchSize / its training examples, rounds × localSteps steps, σ for
    the target ε (the reserved σ when the operator reserved one: then q and the step ceiling must match it)."""
    spec, dataset, reserved = config.site.spec, config.dataset, config.reserved
    try:
        inputs = site_plan_inputs(spec, dataset)
        kwargs = inputs.as_kwargs()
        if reserved is not None:
            kwargs["noise_multiplier"] = reserved.train.noise_multiplier
            if reserved.holdout is not None:
                kwargs["holdout_noise_multiplier"] = reserved.holdout.noise_multiplier
        mechanism = plan_fixed_steps(**kwargs)
    except (AccountingError, ValueError) as error:
        raise PlanMismatchError(f"site {config.name}: {error}; refusing to train (nothing was charged)") from None
    if reserved is not None:
        relative = abs(mechanism.sample_rate - reserved.train.sample_rate) / reserved.train.sample_rate
        if relative > SAMPLE_RATE_TOLERANCE or mechanism.steps > reserved.train.steps:
            raise PlanMismatchError(
                f"site {config.name}: the plan (q={mechanism.sample_rate:.12g}, {mechanism.steps} steps) is not what "
                f"the operator reserved (q={reserved.train.sample_rate:.12g}, {reserved.train.steps} steps); refusing "
                "to train (nothing was charged)"
            )
        holdout = mechanism.holdout_segment
        if holdout is not None and (reserved.holdout is None or holdout.steps > reserved.holdout.steps):
            raise PlanMismatchError(
                f"site {config.name}: {holdout.steps} held-out releases were not reserved; refusing to train"
            )
    training = spec.training
    return TrainingPlan(
        noise_multiplier=mechanism.noise_multiplier,
        sample_rate=mechanism.sample_rate,
        steps=mechanism.steps,
        delta=mechanism.delta,
        target_epsilon=mechanism.target_epsilon,
        accountant=mechanism.accountant,
        max_grad_norm=spec.privacy.max_grad_norm,
        batch_size=training.batch_size,
        physical_batch_size=training.physical_batch_size,
        train_size=mechanism.train_size,
        eval_size=inputs.num_examples - mechanism.train_size,
        planned_epsilon=mechanism.epsilon,
        holdout_fraction=inputs.eval_fraction,
        holdout_noise_multiplier=mechanism.holdout_noise_multiplier,
        releases=mechanism.releases,
        reserved=reserved is not None,
        unit_records=unit_records(config.dataset),
        unit_column=unit_column(config.dataset),
    )


def initialise_journal(config: SiteConfig, *, expect_journal: bool) -> PrivacyJournal:
    """Create the site's journal (first attempt) or check the one there is (a retry must find it: fail closed)."""
    from dptrain.errors import JournalLostError

    plan = site_plan(config)
    job = site_training_job(config.site, config.dataset)
    config.workdir.mkdir(parents=True, exist_ok=True)
    with workdir_lock(config.workdir):
        journal = PrivacyJournal(config.workdir / JOURNAL_NAME)
        if expect_journal and not journal.exists:
            raise JournalLostError(
                f"site {config.name}: this is a restart, but the privacy journal {journal.path} is missing: what the "
                "earlier attempts spent is unknown, so nothing more may run (the reservation stays charged in full)"
            )
        journal.initialise(job_hash=job_fingerprint(job), mechanisms=plan.mechanisms())
    return journal


def state_hash(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a state dict (names, dtypes, shapes, values): identifies the global model a round started from."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


@dataclass
class RoundResult:
    """What a site sends back for one round (or for the final message)."""

    state: dict[str, torch.Tensor] | None
    """The model after the site's DP-SGD steps (None for the final message)."""
    sums: torch.Tensor | None
    """The DP release of held-out sums of the global model received (None when none was asked or none is left)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Public numbers: charged steps and releases, ε, the plan, the site's declared size, steps run this round."""
    replayed: bool = False


@dataclass
class SiteState:
    """The site's own record of its part (``federation-site.json``): read by its supervisor for metrics and exit."""

    rounds: list[int] = field(default_factory=list)
    """Rounds whose update this site computed (and sent)."""
    state: str = "running"
    """running, finished, aborted."""
    message: str = ""
    clipping_mode: str = ""
    updated: str = ""

    @classmethod
    def read(cls, workdir: Path) -> SiteState:
        try:
            raw = json.loads((workdir / SITE_STATUS_NAME).read_text())
        except (OSError, ValueError):
            return cls()
        return cls(
            rounds=[int(r) for r in raw.get("rounds", [])],
            state=str(raw.get("state", "running")),
            message=str(raw.get("message", "")),
            clipping_mode=str(raw.get("clippingMode", "")),
            updated=str(raw.get("updated", "")),
        )

    def write(self, workdir: Path) -> None:
        self.updated = datetime.now(UTC).isoformat(timespec="seconds")
        body = {
            "rounds": self.rounds,
            "state": self.state,
            "message": self.message,
            "clippingMode": self.clipping_mode,
            "updated": self.updated,
        }
        atomic_write(workdir / SITE_STATUS_NAME, (json.dumps(body) + "\n").encode())


def _save(path: Path, payload: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buffer.getvalue())


def _load(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        loaded: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged saved update is ignored: the round is trained (and charged) again
        logger.warning("ignoring the unreadable saved round %s: %s", path, error)
        return None
    return loaded


class SiteRuntime:
    """The site's DP-SGD for one message at a time (one ClientApp process per message, as Flower runs them)."""

    def __init__(self, config: SiteConfig) -> None:
        self.config = config
        self.workdir = config.workdir
        self.plan = site_plan(config)
        self.job = site_training_job(config.site, config.dataset)
        self.spec = config.site.spec

    # --- checks -------------------------------------------------------------------------------------------

    def refusal(self, error: Exception, what: str) -> SiteRefusal:
        """The fixed refusal to raise instead of ``error`` (:class:`~dptrain.federated.protocol.SiteRefusal`):
        Flower sends an exception's text to the coordinator, and an error's own text may say something about this
        site's records. The detail goes to this site's log; its status file gets the same fixed sentence."""
        answer = refusal(error)
        logger.error(
            "site %s refused %s (%s): %s: %s", self.config.name, what, answer.reason, type(error).__name__, error
        )
        status = SiteState.read(self.workdir)
        status.message = str(answer)
        status.write(self.workdir)
        return answer

    def check_fingerprint(self, fingerprint: str) -> None:
        if fingerprint != self.config.fingerprint:
            raise PlanMismatchError(
                f"site {self.config.name}: the coordinator's settings (fingerprint {fingerprint[:12]}…) differ from "
                f"this site's DPFederatedSite ({self.config.fingerprint[:12]}…): refusing to train (nothing was "
                "charged)"
            )

    def _load_data(self) -> PreparedData:
        data = load_data(self.job.spec.dataset, private_dataset=self.config.dataset, base_dir=self.config.data_dir)
        wanted = tuple(self.spec.data.input_shape), self.spec.data.num_classes
        if (data.input_shape, data.num_classes) != wanted:
            raise DataError(
                f"site {self.config.name}: the dataset has shape {data.input_shape} and {data.num_classes} classes, "
                f"the federation's data is {wanted[0]} with {wanted[1]} classes"
            )
        return data

    def _journal(self) -> PrivacyJournal:
        return PrivacyJournal(self.workdir / JOURNAL_NAME)

    def public_metrics(self, journal: PrivacyJournal | None = None, *, steps_run: int = 0) -> dict[str, float]:
        journal = journal or self._journal()
        return {
            "charged-steps": float(journal.charged_steps),
            "charged-releases": float(journal.charged_releases),
            "epsilon": float(journal.epsilon(self.plan.delta, self.plan.accountant)),
            "planned-steps": float(self.plan.steps),
            "target-epsilon": float(self.plan.target_epsilon),
            "declared-size": float(self.config.declared_size),
            "steps-run": float(steps_run),
        }

    # --- messages -----------------------------------------------------------------------------------------

    def _round_path(self, round_number: int) -> Path:
        return self.workdir / UPDATES_DIR / f"round-{round_number:05d}.pt"

    def _replay(self, round_number: int, global_hash: str) -> RoundResult | None:
        saved = _load(self._round_path(round_number))
        if saved is None or saved.get("globalHash") != global_hash:
            return None
        logger.info(
            "site %s: round %d was answered before from this global model: sending it again (no new charge)",
            self.config.name,
            round_number,
        )
        metrics = {**self.public_metrics(), "steps-run": float(saved.get("stepsRun", 0))}
        state = saved.get("state")
        return RoundResult(
            state=dict(state) if state is not None else None, sums=saved.get("sums"), metrics=metrics, replayed=True
        )

    def train_round(
        self, *, round_number: int, global_state: Mapping[str, torch.Tensor], release: bool, fingerprint: str
    ) -> RoundResult:
        """One round: (a DP release of the global model's held-out sums if asked,) then localSteps DP-SGD steps from
        the global model, each chunk charged before it runs."""
        self.check_fingerprint(fingerprint)
        global_hash = state_hash(global_state)
        replayed = self._replay(round_number, global_hash)
        if replayed is not None:
            return replayed
        with self._open() as run:
            self._check_global_model(run, global_state)
            if run.journal.remaining(TRAIN) <= 0:
                raise PrivacyBudgetError(
                    f"site {self.config.name}: all {self.plan.steps} planned DP-SGD steps are charged (a round that "
                    "crashed still counts); refusing round "
                    f"{round_number}"
                )
            unwrap_model(run.private.model).load_state_dict(dict(global_state))
            sums = self._release(run) if release else None
            before = run.step
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
                run.run_chunk()
            steps_run = run.step - before
            clipping_mode = run.private.clipping_mode
            state = {
                key: value.detach().cpu().clone() for key, value in unwrap_model(run.private.model).state_dict().items()
            }
            metrics = self.public_metrics(_own_journal(run), steps_run=steps_run)
        _save(
            self._round_path(round_number),
            {"round": round_number, "globalHash": global_hash, "state": state, "sums": sums, "stepsRun": steps_run},
        )
        self._record(round_number, clipping_mode)
        return RoundResult(state=state, sums=sums, metrics=metrics)

    def finish(
        self, *, round_number: int, global_state: Mapping[str, torch.Tensor], release: bool, fingerprint: str
    ) -> RoundResult:
        """The federation ended: keep the final global model, release its held-out sums if asked, say finished."""
        self.check_fingerprint(fingerprint)
        global_hash = state_hash(global_state)
        final_round = round_number + 1
        replayed = self._replay(final_round, global_hash)
        if replayed is not None:
            result = replayed
        else:
            sums = None
            if release:
                with self._open() as run:
                    self._check_global_model(run, global_state)
                    unwrap_model(run.private.model).load_state_dict(dict(global_state))
                    sums = self._release(run)
            _save(
                self._round_path(final_round),
                {"round": final_round, "globalHash": global_hash, "state": None, "sums": sums, "stepsRun": 0},
            )
            result = RoundResult(state=None, sums=sums, metrics=self.public_metrics())
        export_model(self.workdir / GLOBAL_MODEL_NAME, _StateHolder(dict(global_state)))
        status = SiteState.read(self.workdir)
        status.state, status.message = "finished", f"the federation finished after round {round_number}"
        status.write(self.workdir)
        return result

    def close(self) -> None:
        """The coordinator has the final replies: the supervisor may now stop the SuperNode (after this reply)."""
        atomic_write(self.workdir / FINISHED_MARKER, (json.dumps({"time": time.time()}) + "\n").encode())

    def abort(self, reason: str) -> None:
        """The coordinator gave up: record it (the supervisor stops the SuperNode and reports what was charged)."""
        status = SiteState.read(self.workdir)
        status.state, status.message = "aborted", reason[:2000]
        status.write(self.workdir)
        atomic_write(self.workdir / ABORTED_MARKER, (json.dumps({"reason": reason[:2000]}) + "\n").encode())

    # --- internals ----------------------------------------------------------------------------------------

    def _check_global_model(self, run: TrainingRun, global_state: Mapping[str, torch.Tensor]) -> None:
        """Refuse a global model that does not fit this site's model, or holds a NaN or inf, before anything is
        charged: the coordinator is not trusted, and a non-finite weight would poison every example's gradient."""
        problems = state_problems(global_state, unwrap_model(run.private.model).state_dict())
        if problems:
            raise IncomingModelError(
                f"site {self.config.name}: the coordinator's global model is refused ({'; '.join(problems)}); "
                "nothing was charged"
            )

    def _open(self) -> TrainingRun:
        run = TrainingRun.open(
            self.job,
            self._load_data,
            self.plan,
            workdir=self.workdir,
            dataset=self.config.dataset,
            expect_journal=True,  # the supervisor created it: a missing journal is never a fresh start
            base_dir=self.config.data_dir,
        )
        # Only the releases the coordinator asks for (of the GLOBAL model) leave the site: the engine's own
        # schedule of releases of the local model is switched off, so no holdout budget is spent on them.
        run.schedule = []
        return run

    def _release(self, run: TrainingRun) -> torch.Tensor | None:
        """Charge one release to the holdout partition, then compute the noisy held-out sums of the model now in
        ``run`` (the global model). None when the plan releases nothing or every release is spent."""
        journal = _own_journal(run)
        if journal.remaining(HOLDOUT) <= 0 or self.plan.holdout_noise_multiplier is None:
            return None
        journal.append_intent(1, attempt=run.attempt, start_step=run.step, partition=HOLDOUT)
        return dp_release_sums(
            run.private.model,
            run.holdout_set,
            num_classes=self.spec.data.num_classes,
            noise_multiplier=self.plan.holdout_noise_multiplier,
            bits=run.release_noise,
            device=run.device,
        )

    def _record(self, round_number: int, clipping_mode: str) -> None:
        status = SiteState.read(self.workdir)
        if round_number not in status.rounds:
            status.rounds.append(round_number)
        status.clipping_mode, status.message = clipping_mode, ""
        status.write(self.workdir)


class _StateHolder(torch.nn.Module):
    """A module whose state dict is a given one (to export the global model with the engine's exporter)."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self._state = state

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return self._state


def _own_journal(run: TrainingRun) -> PrivacyJournal:
    """A site trains in one process, which owns its journal (never a distributed rank's mirror of rank 0's)."""
    if not isinstance(run.journal, PrivacyJournal):
        raise TypeError(f"a federated site's run must own its privacy journal, not a {type(run.journal).__name__}")
    return run.journal
