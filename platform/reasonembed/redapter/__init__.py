"""Redapter: training embedding models with RI-InfoNCE (ReasonEmbed, arXiv 2510.08252, SPEC.md section 2).

- ``loss``: ``RIInfoNCELoss`` and ``LossConfig`` (InfoNCE weighted by reasoning intensity, cross-device negatives);
- ``gather``: the collectives behind cross-device negatives;
- ``data``: ``read_training_data`` and ``TrainDataConfig`` (synthesis parquet and the public jsonl release);
- ``batching``: ``BatchPlanner`` (per-domain global batches, sharded across ranks, sampled groups).

Submodules are imported explicitly (``from reasonembed.redapter.loss import RIInfoNCELoss``) so that reading data does
not import torch.
"""
