"""Malicious-model threats: constructions in which the model provider, not a passive observer, makes gradients
leak (PEFTLeak, :mod:`~leak_audit.threats.peftleak`, with bottleneck ViT adapters,
:mod:`~leak_audit.threats.vit_adapters`)."""
