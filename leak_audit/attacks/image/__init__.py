"""Image gradient-inversion attacks: the optimisation loop DLG and Inverting Gradients share, and their registered wrappers."""
