"""A configuration-driven training CLI for transformer models."""
