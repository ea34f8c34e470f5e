"""The provider's example webhooks in tests/fixtures are the published ones, byte for byte."""

from __future__ import annotations

import pytest

from tests.processes import FIXTURES, PUBLISHED_FIXTURES


def test_the_fixtures_are_the_providers_examples_byte_for_byte() -> None:
    if not PUBLISHED_FIXTURES.is_dir():
        pytest.skip(f"the published set is not beside this checkout ({PUBLISHED_FIXTURES})")
    published = {path.name: path.read_bytes() for path in PUBLISHED_FIXTURES.glob("*.json")}
    kept = {path.name: path.read_bytes() for path in FIXTURES.glob("*.json")}
    assert published, "no published fixtures"
    assert kept == published
