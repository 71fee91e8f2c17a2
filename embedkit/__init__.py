"""embedkit: embeddings, probes, neighbours and explanations for cell microscopy."""

__version__ = "0.1.0"
