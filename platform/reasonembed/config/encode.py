"""Config of the batch-encoding job: corpus source, embedder, Ray Data engine, FAISS index."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from reasonembed.config.base import JobConfig, StrictModel
from reasonembed.config.embedder import EmbedderConfig


class CorpusSource(StrictModel):
    """Where a corpus comes from and which fields hold ids and texts."""

    path: str = Field(
        "",
        description="A BEIR-layout folder (corpus.jsonl inside), a .jsonl/.json/.parquet file or folder of files; "
        "local or s3://.",
    )
    format: Literal["auto", "jsonl", "parquet"] = Field("auto", description="File format (auto: by extension).")
    id_field: str = Field("id", description="Column with the document id ('_id' is accepted as a fallback).")
    text_field: str = Field("text", description="Column with the document text.")
    title_field: str | None = Field(
        "title",
        description="Optional title column; when present, non-empty and not already the start of the text, the "
        "text is '<title> <text>' (BEIR/MTEB convention). None: ignore titles.",
    )
    limit: int | None = Field(None, ge=1, description="Only the first N documents (smoke runs).")


class EncodeEngineConfig(StrictModel):
    """How the Ray Data actor pool runs."""

    backend: Literal["ray", "serve"] = Field(
        "ray", description="ray: a private actor pool of Embedders; serve: a running Serve embedding deployment."
    )
    serve_app: str = Field("reasonembed", description="Serve application name when backend=serve.")
    actors: int = Field(1, ge=1, description="Embedder actors in the pool (one model replica each).")
    num_cpus_per_actor: float = Field(
        1.0, gt=0, description="CPUs Ray reserves per actor. Leave room for the read/parse tasks that feed the pool: "
        "an actor holding every CPU of the cluster starves them and the job stalls."
    )
    threads_per_actor: int | None = Field(
        None, ge=1, description="torch threads per CPU actor (None: the node's cores divided by actors)."
    )
    num_gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per actor (0 on CPU).")
    rounds_per_pool: int = Field(
        0, ge=0, description="Rounds one actor pool serves before the next group of rounds starts a fresh one "
        "(0: one pool, one model load per replica, for the whole job). With the encode job's parquet reads on "
        "Ray's V1 datasource a long-lived actor stays flat (measured at 1M documents, docs/scale.md); set N > 0 to "
        "restart the pool every N rounds anyway, e.g. to return an actor's memory to the node between rounds."
    )
    trim_heap: bool = Field(
        True, description="Give freed heap memory back to the OS after every window (glibc malloc_trim), so a "
        "long-lived actor's memory stays flat; measured cost about 10 % on a tiny model, less on real ones "
        "(docs/scale.md). A no-op outside glibc Linux."
    )
    accelerator_type: str | None = Field(None, description="Ray accelerator type for GPU actors, e.g. 'H100'.")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources per actor, e.g. {gpu_infer: 1} so actors land on that node type "
        "(cluster/aws-gpu.yaml); `reasonembed submit --cluster-spec` checks some node type provides them.",
    )
    window_rows: int = Field(
        1024, ge=1, description="Rows handed to an actor per call. Rows are length-sorted within a window and cut "
        "into token-budget batches, so streaming works for corpora larger than memory."
    )
    rows_per_shard: int = Field(
        2000, ge=1, description="Rows per output part file (the unit of resume: a finished shard is never redone)."
    )
    shards_per_round: int = Field(
        16, ge=1, description="Shards per round. Every round streams through the same engine, in order; the driver holds "
        "one round's embeddings and commits its shards when the next round's rows begin."
    )


class IndexConfig(StrictModel):
    """The FAISS index built from the embeddings."""

    build: bool = Field(True, description="Build a FAISS index after encoding.")
    kind: Literal["flat", "ivf", "hnsw"] = Field("flat", description="flat (exact IndexFlatIP), ivf or hnsw.")
    shard_size: int = Field(5_000_000, ge=1, description="Max vectors per FAISS shard; larger corpora are sharded.")
    ivf_nlist: int | None = Field(None, ge=1, description="IVF lists (None: 4*sqrt(N)).")
    ivf_nprobe: int = Field(32, ge=1, description="IVF lists probed per query.")
    hnsw_m: int = Field(32, ge=4, description="HNSW graph degree.")
    hnsw_ef_search: int = Field(128, ge=1, description="HNSW search breadth.")
    store_texts: bool = Field(
        False, description="Keep doc texts next to the index (index/texts.parquet: doc_id, text), so the search API "
        "can return them (return_text). Each shard's texts are kept under texts/ until the index is built."
    )


class EncodeJobConfig(JobConfig):
    """`reasonembed encode`: corpus -> embeddings parquet shards -> FAISS index, resumable by shard."""

    FLAGS: ClassVar[dict[str, str]] = {"model": "embedder.model", "data": "data.path", "out": "out"}
    SWITCHES: ClassVar[dict[str, str]] = {"overwrite": "overwrite"}  # `reasonembed encode --overwrite`

    data: CorpusSource = Field(default_factory=CorpusSource, description="The corpus to encode.")
    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig, description="The embedding model.")
    engine: EncodeEngineConfig = Field(default_factory=EncodeEngineConfig, description="Ray Data engine settings.")
    index: IndexConfig = Field(default_factory=IndexConfig, description="FAISS index settings.")
    stage: str = Field("encode", description="Stage folder name under the run directory.")
    overwrite: bool = Field(
        False, description="Discard an existing stage started under a different config or made from inputs that "
        "have changed since (corpus files, model), and redo it."
    )
