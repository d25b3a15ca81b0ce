"""Search over an encode job's FAISS index: resolve the folder, check the encoder, return hits (and texts).

``index`` may point at an encode output folder (``<run>/encode``, whose index lives in ``index/``) or at the index
folder itself, locally or on S3. When the index folder carries ``texts.parquet`` (columns ``doc_id``, ``text``;
the encode job writes it with ``index.store_texts: true``), hits can include the document text. Excluded ids are removed after retrieval, as in the BRIGHT protocol
(``SearchIndex.search``), so a query may get fewer than ``top_k`` hits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from reasonembed.config.base import StorageConfig
from reasonembed.index.faiss_index import META, TEXTS, SearchIndex
from reasonembed.serving.errors import InvalidRequest, PayloadTooLarge
from reasonembed.storage import Location, join


def resolve_index_uri(uri: str, storage: StorageConfig | None = None) -> str:
    """The index folder for an encode output folder or an index folder; FileNotFoundError names both tried."""
    loc = Location(uri, storage)
    if loc.exists(META):
        return uri
    if loc.exists(f"index/{META}"):
        return join(uri, "index")
    raise FileNotFoundError(
        f"index: no FAISS index at {uri} (looked for {META} and index/{META}); point it at an encode output folder "
        "(`reasonembed encode` writes <run>/encode/index/) or an index folder"
    )


@dataclass
class Hit:
    doc_id: str
    score: float
    text: str | None = None


class Retriever:
    """A loaded index plus optional texts."""

    def __init__(self, index: SearchIndex, uri: str, texts: dict[str, str] | None = None):
        self.index = index
        self.uri = uri
        self.texts = texts

    @classmethod
    def load(cls, uri: str, storage: StorageConfig | None = None) -> Retriever:
        index_uri = resolve_index_uri(uri, storage)
        index = SearchIndex.load(index_uri, storage)
        loc = Location(index_uri, storage)
        texts = None
        if loc.exists(TEXTS):
            table = loc.read_table(TEXTS)
            texts = dict(zip(table.column("doc_id").to_pylist(), table.column("text").to_pylist(), strict=True))
        return cls(index, index_uri, texts)

    def check_compatible(self, encoder: dict) -> None:
        """Raise IndexMismatchError when the served model is not the one that built the index."""
        self.index.check_compatible(encoder)

    def search(self, query_embs: np.ndarray, top_k: int, excluded: Sequence[Sequence[str]] | None = None,
               with_text: bool = False) -> list[list[Hit]]:
        results = self.index.search(query_embs, top_k, excluded)
        return [[Hit(d, s, self.texts.get(d) if with_text and self.texts is not None else None) for d, s in hits]
                for hits in results]

    def describe(self) -> dict:
        return {"uri": self.uri, "ntotal": self.index.ntotal, "dim": self.index.dim,
                "kind": self.index.meta.get("kind"), "texts": self.texts is not None}


def per_query_exclusions(excluded: list | None, n_queries: int, limit: int) -> list[list[str]]:
    """``excluded_ids`` of a search request as one list per query: a flat list applies to every query, a list of
    lists must have one list per query (400 otherwise); more than ``limit`` ids in total is a 413."""
    if excluded and isinstance(excluded[0], list):
        if len(excluded) != n_queries:
            raise InvalidRequest(f"excluded_ids has {len(excluded)} lists for {n_queries} queries; send one list "
                                 "per query or one flat list for all", param="excluded_ids")
        total, per_query = sum(len(x) for x in excluded), [list(x) for x in excluded]
    else:
        total, per_query = len(excluded or []), [list(excluded or [])] * n_queries
    if total > limit:
        raise PayloadTooLarge(f"excluded_ids has {total} ids; the limit is {limit} (limits.max_excluded_ids)",
                              param="excluded_ids")
    return per_query
