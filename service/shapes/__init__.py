"""A synthetic "shapes" world with exact ground truth, for the demo models and quality tests."""
