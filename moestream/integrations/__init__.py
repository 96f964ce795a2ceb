"""Bridges into other engines. Each imports its engine only when used."""
