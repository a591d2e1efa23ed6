"""Shared helpers for the test suite (model writers, references)."""
