"""Test-suite configuration.

In CI (CI=true) hypothesis draws the same examples every run (derandomize), so a red CI
means a change broke something, not that a new random draw came up; on a developer's
machine it keeps exploring new examples.

`liblightkv`: the fixture every native test module uses (pytestmark); it fails, never skips,
when the library does not load.
"""
import os

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def liblightkv():
    """liblightkv loaded, with the names of its ggml devices. A build that does not load
    FAILS every test that needs it (never a skip: a broken build must not turn the parity
    suites into skips that leave CI green)."""
    try:
        from lightkv_edge import native
        return native.backends()
    except Exception as e:  # noqa: BLE001 - any reason is a failure, reported in one line
        pytest.fail(f"liblightkv does not load ({type(e).__name__}: {e}); run `make setup`",
                    pytrace=False)
