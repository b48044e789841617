"""Proctor's data plane: the gateway on every connection's path."""
