"""Test-suite configuration.

In CI (CI=true) hypothesis draws the same examples every run (derandomize), so a red CI
means a change broke something, not that a new random draw came up; on a developer's
machine it keeps exploring new examples.
"""
import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
