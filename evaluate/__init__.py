"""Shared machinery: checkpoint -> backbone -> features -> result record."""
