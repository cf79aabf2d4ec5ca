"""I/O adapters around the sans-I/O core: capture files, NFQUEUE, sinks, metrics."""
