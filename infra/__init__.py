"""Proctor's AWS CDK app: one Stack per deployable boundary, one Construct per concern."""
