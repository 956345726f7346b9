"""The serving runtime: executes an export's manifest with a paged KV cache."""
