"""Benchmarks that the CLI runs (`moestream bench io|decode`): they live beside the engine, not
inside it; nothing in formats/, storage/ or compute/ imports them."""
