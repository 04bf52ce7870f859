"""Layer 0: what every other layer may import: the errors users see, the run configuration, safe file writes."""
