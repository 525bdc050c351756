"""The release gate: the leakage policy (rules and their evaluation), the ``--max`` threshold form, and what happens on a breach during training."""
