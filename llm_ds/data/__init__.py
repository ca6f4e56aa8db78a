"""Data: local sources, tokenization, packing, the token cache and per-rank loaders."""
