"""Helpers shared by the test packages (`helpers.service` for the service tests)."""
