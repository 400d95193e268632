"""Configuration: `schema` (typed dataclasses) and `validate` (cross-field checks)."""
