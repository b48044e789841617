"""Proctor's user-facing CLI and local stack."""
