"""Every cross-process name lives in dptrain_api.contract: no other module spells a DPTRAIN_* variable or the
contract's fixed ports as a literal (a typo there would be a silent mismatch between the operator and a pod)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from dptrain_api import DEFAULT_MASTER_PORT, SUPERNODE_RUNTIME_PORT

REPO = Path(__file__).resolve().parents[2]
SOURCES = [path for root in ("api/src", "operator/src", "trainer-image/src") for path in (REPO / root).rglob("*.py")]
CONTRACT = REPO / "api/src/dptrain_api/contract.py"
# The operator's own settings are DPTRAIN_ + a field name (the chart sets them; test_chart checks every one).
SETTINGS_PREFIX = (REPO / "operator/src/dptrain_operator/settings.py", "DPTRAIN_")
ENV_NAME = re.compile(r"^DPTRAIN_[A-Z0-9_]*$")
PORTS = {DEFAULT_MASTER_PORT, SUPERNODE_RUNTIME_PORT}


def _literals(path: Path) -> list[tuple[int, object]]:
    return [
        (node.lineno, node.value) for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Constant)
    ]


@pytest.mark.parametrize("path", [p for p in SOURCES if p != CONTRACT], ids=lambda p: str(p.relative_to(REPO)))
def test_no_contract_name_outside_the_contract(path: Path) -> None:
    found = [
        f"line {line}: {value!r}"
        for line, value in _literals(path)
        if (isinstance(value, str) and ENV_NAME.match(value) and (path, value) != SETTINGS_PREFIX)
        or (isinstance(value, int) and not isinstance(value, bool) and value in PORTS)
    ]
    assert not found, f"use dptrain_api.contract (PodEnv, DistributedEnv, the port constants): {found}"


def test_the_lint_sees_a_literal() -> None:
    """The check itself: a module that spells one is caught."""
    literals = [value for _, value in _literals(CONTRACT) if isinstance(value, str) and ENV_NAME.match(value)]
    assert "DPTRAIN_LOCK_WAIT_SECONDS" in literals
    assert "DPTRAIN_FEDERATION_EXPECTED_SITES" in literals
