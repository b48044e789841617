"""Stacks, one per deployable boundary; they only wire constructs together."""
