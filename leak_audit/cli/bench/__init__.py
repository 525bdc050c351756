"""Benchmarks run from the ``leak-audit bench`` command line.

* :mod:`~leak_audit.cli.bench.text` (``leak-audit bench text``): per-attack leakage (ROUGE, token recall,
  exact match) and seconds per batch on real sentences, for several tapped views and batch sizes; the run
  is :mod:`~leak_audit.cli.bench.text_run`, the views :mod:`~leak_audit.cli.bench.views`, the rows and their
  outputs :mod:`~leak_audit.cli.bench.text_rows`; DP-SGD gradients :mod:`~leak_audit.cli.bench.dp`, LoRA
  fine-tuning :mod:`~leak_audit.cli.bench.lora`, the noise plot :mod:`~leak_audit.cli.bench.plot`.
* :mod:`~leak_audit.cli.bench.image` (``leak-audit bench image``): PSNR, SSIM, LPIPS of image reconstructions.
* :mod:`~leak_audit.cli.bench.overhead` (``leak-audit bench overhead``): training steps/s with and without
  the callback; its statistics and outputs are :mod:`~leak_audit.cli.bench.overhead_rows`.
* :mod:`~leak_audit.cli.bench.common`: what they share (bad input, list options, JSON and markdown outputs).
"""

__all__: list[str] = []
