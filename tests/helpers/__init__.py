"""Helpers the tests run or import: a DDP training job, a job killed mid-audit, a simulated accelerator."""
