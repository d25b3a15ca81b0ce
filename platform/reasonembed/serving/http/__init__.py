"""The HTTP side of the embedding service, as an installed package: the Ray Serve application (``app``: routes,
ingress, ``build_app``), its model deployment (``replica``), the request and response models (``protocol``) and the
``reasonembed serve`` launcher (``launch``).

Importing this package imports nothing heavy; ``app`` pulls in FastAPI and Ray Serve.
"""
