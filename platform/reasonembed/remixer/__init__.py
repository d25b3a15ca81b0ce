"""ReMixer: ReasonEmbed's data synthesis (arXiv 2510.08252) as a resumable, exactly-once Ray job.

Stages, one module each: ``prepare`` (stage 0), ``generate`` (stage 1 and the reasoning query), ``mine``
(stage 2), ``annotate`` (stage 3), ``format`` (stage 4); ``pipeline.run(cfg)`` wires them and ``report`` summarises.
Prompts and domain profiles live in ``prompts``, strict output parsing in ``parsing``.
"""
