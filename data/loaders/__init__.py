"""From sources to batches: the recipes (what a worker does to an image, what the device does to a batch), the
samplers, collation and the DataLoaders themselves (build)."""
