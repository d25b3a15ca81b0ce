"""Models: the Embedder (pooling, instructions, truncation, token-budget batching), model references, tiny models."""
