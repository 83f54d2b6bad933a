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
