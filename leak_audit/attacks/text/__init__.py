"""Text gradient-inversion attacks, one registered attack (or one attack's building block) per module."""
