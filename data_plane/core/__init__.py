"""The protocol-agnostic core: grants, credentials, recording, evidence and policy hooks."""
