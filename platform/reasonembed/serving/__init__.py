"""Library side of the embedding service: engine (tokenise, token-budget batches, forward), batcher, auth, limits,
metrics, search over encode outputs, and a Ray Data engine that encodes through a running Serve deployment.

The HTTP routes and request models live in the repository's ``serve/`` folder (not part of the package); this
package holds everything they call, so it can be tested without HTTP.
"""

MODEL_DEPLOYMENT = "EmbeddingModel"
INGRESS_DEPLOYMENT = "EmbeddingAPI"
