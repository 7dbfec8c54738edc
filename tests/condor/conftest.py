"""The condor tier: a real HTCondor pool (tests/fixtures/condor.py); its timings are printed at the end."""

from __future__ import annotations

import pytest

from tests.fixtures.condor import TIMINGS, condor_pool

__all__ = ["condor_pool"]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TIMINGS:
        terminalreporter.write_sep("-", "condor tier timings (s)")
        for k, v in TIMINGS.items():
            terminalreporter.write_line(f"{k}: {v:.1f}")
