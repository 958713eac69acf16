"""Pre-labeling: what the service answered, kept per image (``records``), exported to annotation formats
(``exports``), and produced in bulk through the service (``run``)."""
