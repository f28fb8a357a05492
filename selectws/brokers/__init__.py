"""Brokers carry group messages between connections (and, later, between processes)."""
