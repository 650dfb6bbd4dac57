"""Fixtures shared by every part's tests."""

from __future__ import annotations

import os
import shutil

import pytest


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    for item in items:
        if "bind" in item.keywords and shutil.which("named") is None:
            item.add_marker(pytest.mark.skip(reason="BIND named is not installed"))
        if "netns" in item.keywords and os.geteuid() != 0:
            item.add_marker(pytest.mark.skip(reason="network namespaces need root"))
