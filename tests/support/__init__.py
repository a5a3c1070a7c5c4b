"""Helpers that several test files share (tests/ is on sys.path because conftest.py lives there):
`from support.moe import moe_model`. Fixtures shared across files are in tests/conftest.py."""
