"""Feature extraction: pretrained CNN backbones and multi-scale patch embeddings."""
