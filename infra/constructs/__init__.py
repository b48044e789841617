"""Constructs, one concern each: evidence storage, the control-plane API, a regional gateway fleet."""
