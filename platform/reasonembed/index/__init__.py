"""Batch encoding of corpora (Ray Data actor pools) and FAISS indexes over the embeddings."""
