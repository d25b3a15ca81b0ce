"""Output transforms of the embeddings API: Matryoshka truncation and the base64 wire format.

Matryoshka (Kusupati et al., 2022, arXiv 2205.13147): keep the first ``d`` coordinates and L2-renormalise,
``e' = e[:d] / ||e[:d]||``, so inner products stay cosines. Only meaningful for models trained with nested
dimensions; for others it is a lossy projection, which is what OpenAI's ``dimensions`` parameter promises anyway.

base64: the little-endian float32 bytes of the vector, base64-encoded — what the official ``openai`` client decodes
(``np.frombuffer(base64.b64decode(s), dtype="float32")``).
"""

from __future__ import annotations

import base64

import numpy as np


def matryoshka(emb: np.ndarray, dims: int | None) -> np.ndarray:
    """First ``dims`` coordinates of each row, renormalised to unit length (rows of zeros stay zero)."""
    if dims is None or dims >= emb.shape[1]:
        return emb
    x = np.ascontiguousarray(emb[:, :dims], dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def to_base64(vec: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(vec, dtype="<f4").tobytes()).decode("ascii")


def from_base64(s: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype="<f4")


def wire_vectors(emb: np.ndarray, encoding_format: str) -> list:
    """Per-row payloads: lists of floats (float32 values, exactly representable in JSON) or base64 strings."""
    if encoding_format == "base64":
        return [to_base64(row) for row in emb]
    return emb.astype(np.float32, copy=False).tolist()
