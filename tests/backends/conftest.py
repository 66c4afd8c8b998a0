"""Backend tests: the real-daemon fixtures live in tests/fixtures (importable by any test)."""
from fixtures.runs import wait_for  # noqa: F401
