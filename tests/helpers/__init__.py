"""Helpers the tests share (not tests): hand-made references, tiny models and small runs. tests/ is on
pytest's path (pyproject.toml), so a test imports them as `from helpers.routing_reference import …`."""
