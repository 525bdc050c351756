"""Demo data and models for examples, tests and benchmarks (in the spirit of ``lightning.pytorch.demos``): a generated PII text data set, a TSV reader and reference image classifiers."""
