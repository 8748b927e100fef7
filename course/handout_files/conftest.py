"""pytest options of the starter.

``--todo-xfail`` (what `make ci` and .ci/run use): a test that stops at a TODO
not done yet, i.e. raises ``NotImplementedError("not implemented: ...")``,
counts as an expected failure instead of a failure. Any other failure, a wrong
answer included, still fails. Without the option (``make test``) such a test
fails, so that the TODOs left show up.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    parser.addoption(
        "--todo-xfail", action="store_true", help="count a test stopped by a TODO not done yet as an expected failure"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    exc = call.excinfo
    if not (item.config.getoption("--todo-xfail") and report.failed and exc is not None):
        return
    if exc.errisinstance(NotImplementedError) and str(exc.value).startswith("not implemented:"):
        report.outcome = "skipped"
        report.wasxfail = f"TODO not done yet: {exc.value}"
