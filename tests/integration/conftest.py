"""Integration tests use the stack fixtures of tests/conftest.py."""
