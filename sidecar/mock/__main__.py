"""`python -m sidecar.mock`: run the fake provider (the bench and tests start it this way)."""

from sidecar.mock.cli import mock_upstream

mock_upstream()
