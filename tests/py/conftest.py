"""Shared pytest fixtures: where the built binaries are."""
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def moed_bin():
    """Path of the built `moed` binary (MOED_BIN, else build/moed)."""
    path = pathlib.Path(os.environ.get("MOED_BIN", ROOT / "build" / "moed"))
    assert path.exists(), f"{path} is not built; run `make` first"
    return path


@pytest.fixture(scope="session")
def build_dir():
    return pathlib.Path(os.environ.get("MOED_BUILD", ROOT / "build"))


def _log_skip(nodeid, report):
    """Appends "pytest: <test>: <reason>" to MOE_SKIP_LOG (see tests/skip.h):
    `make pytest` ends with the count of these lines."""
    path = os.environ.get("MOE_SKIP_LOG")
    if not path:
        return
    lr = report.longrepr
    reason = lr[2] if isinstance(lr, tuple) and len(lr) == 3 else str(lr)
    reason = reason.removeprefix("Skipped: ")
    if hasattr(report, "wasxfail"):
        reason = f"xfail: {report.wasxfail or reason}"
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"pytest: {nodeid}: {' '.join(reason.split())}\n")


def pytest_runtest_logreport(report):
    # skipif marks skip in setup, pytest.skip() in the call
    if report.skipped:
        _log_skip(report.nodeid, report)


def pytest_collectreport(report):
    # a whole module skipped at import (pytest.skip(allow_module_level=True))
    if report.skipped:
        _log_skip(report.nodeid, report)
