"""Proctor control plane: Lambda handlers and the domain they serve."""
