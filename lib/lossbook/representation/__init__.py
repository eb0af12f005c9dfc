"""Representation learning: contrastive and self-supervised objectives, and the geometry of the embeddings they learn."""
