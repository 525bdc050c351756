"""Malicious-model threats: constructions in which the model provider, not a passive observer, makes gradients leak (PEFTLeak with bottleneck ViT adapters)."""
