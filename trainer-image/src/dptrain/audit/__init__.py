"""Empirical privacy audit: one training run with canaries gives a statistically valid lower bound on ε.

:func:`run_audit` trains the job's own DP-SGD pipeline once on stand-in data with gradient- and input-space
canaries (:mod:`dptrain.audit.canaries`), each included with probability ½, guesses which were included, and
turns the guesses into ε̂ (:mod:`dptrain.audit.bound`, Steinke, Nasr & Jagielski 2023). ε̂ above the claimed ε
means the pipeline is not as private as claimed; ε̂ below it proves nothing more than that.
"""

from dptrain.audit.bound import GuessCount, best_lower_bound, epsilon_lower_bound, p_value
from dptrain.audit.pipeline import KINDS, AuditResult, AuditSettings, KindResult, run_audit
from dptrain.audit.report import AUDIT_REPORT_NAME, audit_report, verdict, write_audit_report

__all__ = [
    "AUDIT_REPORT_NAME",
    "KINDS",
    "AuditResult",
    "AuditSettings",
    "GuessCount",
    "KindResult",
    "audit_report",
    "best_lower_bound",
    "epsilon_lower_bound",
    "p_value",
    "run_audit",
    "verdict",
    "write_audit_report",
]
