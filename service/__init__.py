"""detseg: open-vocabulary detect-then-segment over gRPC."""

__version__ = "0.1.0"
