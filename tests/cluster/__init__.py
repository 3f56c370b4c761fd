"""A package: its conftest is then cluster.conftest, and `from conftest import ...` still finds tests/conftest.py."""
