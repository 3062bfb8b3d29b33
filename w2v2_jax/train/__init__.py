"""Training: state, checkpointing (the only Orbax importer) and the loop."""
