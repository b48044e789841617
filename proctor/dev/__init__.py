"""The local stack: the embedded default that runs everything on one machine, no AWS account."""
