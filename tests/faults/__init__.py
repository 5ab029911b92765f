"""Fault-injection suite: breaks nbmplock on purpose and checks every byte (issue 6)."""
