"""The trainer's one exception tree. The CLI prints ``str(error)`` and exits with ``error.exit_code``.

Distinct exit codes (:class:`dptrain_api.ExitCode`, part of the pod contract) let the operator tell a
bad manifest from bad data or a bad model without parsing messages, and keep all of them apart from a
crash (Python's own exit code 1 paths).
"""

from __future__ import annotations

from dptrain_api import ExitCode


class DptrainError(Exception):
    """Root of every error the trainer reports to the user."""

    exit_code: int = ExitCode.CRASHED


class ConfigurationError(DptrainError):
    """The manifest or the training plan is inconsistent (for example a datasetRef with no dataset)."""

    exit_code = ExitCode.INVALID_CONFIGURATION


class DataError(DptrainError):
    """The data cannot be used as declared; the message names the file, column and problem."""

    exit_code = ExitCode.INVALID_DATA


class DeclaredSizeMismatchError(DataError):
    """A DP count of the held-out records is far from what the declared numExamples implies: the file is not the one
    declared (a wrong path, an empty or truncated file). Decided from a DP release only."""

    exit_code = ExitCode.DECLARED_SIZE_MISMATCH


class ModelError(DptrainError):
    """The model spec, the custom factory or the pretrained weights are unusable."""

    exit_code = ExitCode.INVALID_MODEL


class IncomingModelError(ModelError):
    """Weights from outside (a federation coordinator's global model) do not fit the model or are not finite."""


class ClippingError(ModelError):
    """The model cannot be trained with the requested per-example clipping (dptrain.clipping)."""


class UnsupportedLayerError(ClippingError):
    """A trainable parameter sits in a layer no book-keeping kernel covers exactly (the message names it).

    The engine may route such a model to Opacus' hooks mode instead.
    """

    def __init__(self, message: str, *, module: str, parameters: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.module = module
        self.parameters = parameters


class BatchMixingLayerError(UnsupportedLayerError):
    """A layer mixes examples across the batch (BatchNorm and friends): no per-example clipping is valid."""


class ParameterReuseError(ClippingError):
    """A parameter is shared between layers, or a layer ran more than once in one forward pass."""


class ClippingProtocolError(ClippingError):
    """Forward, backward and optimizer calls came in an order the clipping cannot attribute exactly.

    Examples: two forward passes feeding one backward, a second backward of the same graph, or a layer
    that does not see the batch along dimension 0.
    """


class PlanMismatchError(ConfigurationError):
    """The data or the plan disagrees with the mechanism the operator reserved in the dataset ledger."""


class AuditError(ConfigurationError):
    """A privacy audit cannot run as asked (for example on a PrivateDataset's own records: audits never train on
    patient data)."""


class CheckpointError(DptrainError):
    """The output directory's checkpoint or privacy journal cannot be used (another job's, or damaged)."""

    exit_code = ExitCode.CHECKPOINT_UNUSABLE


class JournalError(CheckpointError):
    """The write-ahead privacy journal is damaged or inconsistent; training is refused (ε would be unknown)."""


class JournalLostError(JournalError):
    """A retry found no privacy journal: what the earlier attempts spent is unknown, so nothing more may run
    (a fresh journal would under-report). The job fails and stays charged in full."""

    exit_code = ExitCode.JOURNAL_LOST


class PrivacyBudgetError(DptrainError):
    """Running would charge more than the plan (or the dataset's reservation) allows."""

    exit_code = ExitCode.PRIVACY_BUDGET


class TrainingInterrupted(DptrainError):  # noqa: N818 - a requested stop, not an error
    """A signal asked the trainer to stop: it finished the current step and checkpointed.

    ``exit_code`` is 128 + the signal number (143 for SIGTERM), as a shell reports a signalled process.
    """

    def __init__(self, message: str, *, exit_code: int = ExitCode.TERMINATED, step: int = 0) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.step = step
