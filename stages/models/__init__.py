"""Detector builders, heads and losses."""
