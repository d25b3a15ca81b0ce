"""Redapter: training embedding models with RI-InfoNCE (ReasonEmbed, arXiv 2510.08252, docs/training.md).

- ``loss``: ``RIInfoNCELoss`` and ``LossConfig`` (InfoNCE weighted by reasoning intensity, cross-device negatives);
- ``gather``: the collectives behind cross-device negatives;
- ``data``: ``read_training_data`` and ``TrainDataConfig`` (synthesis parquet and the public jsonl release);
- ``batching``: ``BatchPlanner`` (per-domain global batches, sharded across ranks, sampled groups);
- ``trainer``: ``run(TrainJobConfig) -> dict``, the library entry of `reasonembed train` (Ray Train driver);
- ``worker``: the per-worker loop (``TrainWorker``: setup, resume, train_epoch, finish over ``WorkerArgs``);
  ``model``: the bi-encoder (LoRA, gradient checkpointing); ``engine``: DDP and DeepSpeed behind one interface;
  ``state``: checkpoint fingerprints and the newest complete checkpoint;
  ``session``: Ray Train or in-process runner; ``curves``: step log, events and PNG; ``faults``: kill injection;
- ``export``: the trained model as a sentence-transformers folder; ``dev_eval``: end-of-training retrieval check;
  ``samples``: training rows from a judged task with negatives mined by the platform's encoder and FAISS.

Submodules are imported explicitly (``from reasonembed.redapter.loss import RIInfoNCELoss``) so that reading data does
not import torch.
"""
