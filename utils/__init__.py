"""Everything the entry scripts run: config, data plumbing, training and evaluation engines, metrics."""
