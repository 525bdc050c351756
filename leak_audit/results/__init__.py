"""Where audit results go: the audit-log schema and reader, Lightning logger sinks, and the W&B dashboard."""
