"""The ``dptrain-operator`` console script. It imports nothing heavy.

multiprocessing re-runs the main module in every child it starts, and the operator starts one per plan or ledger
composition (:mod:`dptrain_operator.workers`). A script that imported the operator (kopf, the kubernetes client)
cost every child ~0.8 CPU s before its computation, on top of a computation that takes ~0.1 s.
"""

from __future__ import annotations


def main() -> None:
    """Run the operator (its imports happen here, not when the script is loaded)."""
    from dptrain_operator.main import run

    run()
