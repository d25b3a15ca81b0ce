"""What every ReMixer stage gets: the config, the run folder, the domain profiles, and the stage hash chain.

A stage's hash covers its own settings and the hashes of the stages it reads, so changing, say, the generator's
temperature changes the hashes of generate, mine, annotate and format but not prepare. A finished stage whose
manifest carries the same hash and the same input fingerprints (``Stage.inputs`` in ``remixer.stage``: files, models,
upstream outputs) is skipped; a stage folder begun under another hash or from other inputs is refused (or discarded with
``overwrite: true``) rather than mixing rows of two configs or two versions of the data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from reasonembed.config.synthesize import SynthesizeJobConfig
from reasonembed.llm.engine_pool import EnginePool
from reasonembed.remixer.prompts import DomainProfile, profiles
from reasonembed.storage import RunDir, StageDir, open_run

STAGE_ROOT = "synthesize"
# Stage names in pipeline order (folders under <run>/synthesize/).
STAGES = ("prepare", "generate", "reason", "mine", "annotate", "format")


@dataclass
class Context:
    cfg: SynthesizeJobConfig
    run: RunDir
    profiles: dict[str, DomainProfile]
    hashes: dict[str, str] = field(default_factory=dict)
    # The run's shared vLLM engines (one per model and engine settings); None: each LLM stage starts its own.
    engines: EnginePool | None = None

    @classmethod
    def open(cls, cfg: SynthesizeJobConfig) -> Context:
        return cls(cfg=cfg, run=open_run(cfg.out, cfg.run_id, cfg.storage), profiles=profiles(cfg))

    def stage(self, name: str) -> StageDir:
        return self.run.stage(f"{STAGE_ROOT}/{name}")

    def previous_hash(self, name: str) -> str:
        """The config hash of the stage run before ``name`` (``reason`` is skipped when disabled): the link of the
        hash chain. The pipeline records each stage's hash in ``hashes`` before running it."""
        order = [s for s in STAGES if s != "reason" or self.cfg.reasoning.enabled]
        i = order.index(name)
        return self.hashes[order[i - 1]] if i else ""

    @property
    def seed(self) -> int:
        return self.cfg.seed
