"""Where audit results go: the audit-log schema and reader, Lightning logger sinks, the W&B dashboard, the console summary table and image grids."""
