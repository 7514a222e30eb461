"""Exceptions raised by :mod:`dptrain_accounting`."""

from __future__ import annotations

__all__ = ["AccountingError", "CalibrationError", "UnsupportedAccountantError"]


class AccountingError(Exception):
    """Root of the exceptions specific to privacy accounting."""


class UnsupportedAccountantError(AccountingError, ValueError):
    """The requested privacy accountant is unknown or deliberately refused (``"gdp"``)."""


class CalibrationError(AccountingError, ValueError):
    """A noise multiplier meeting the privacy target cannot be found (or the inputs are invalid)."""
