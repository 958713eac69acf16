"""Adapting the served models to a user's domain from their labels (``detseg adapt``): the detector with
ultralytics' own trainer, SAM 2's mask decoder on cached image features (full or low-rank), before/after
evaluation through the service, and a signed, versioned result the server loads with ``--adapted``."""
