"""Run the tests from a scratch directory.

Trial's ``TestCase.mktemp`` makes paths relative to the working directory;
under pytest that would be the checkout, so move to a temporary one.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _scratch_directory(tmp_path_factory):
    before = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(before)
