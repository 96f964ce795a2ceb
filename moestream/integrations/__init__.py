"""Bridges into other engines. Each imports its engine only when used:
`moestream.integrations.transformers` (the `hf` extra)."""
