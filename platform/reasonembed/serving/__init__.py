"""Library side of the embedding service: engine (tokenise, token-budget batches, forward), batcher, auth, limits,
metrics, search over encode outputs, and a Ray Data engine that encodes through a running Serve deployment.

The HTTP routes, request models and the ``reasonembed serve`` launcher are in ``reasonembed.serving.http``; the
modules here hold everything they call, so they can be tested without HTTP.
"""

MODEL_DEPLOYMENT = "EmbeddingModel"
INGRESS_DEPLOYMENT = "EmbeddingAPI"
