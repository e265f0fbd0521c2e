"""The elastic model: config, shapes, pack, loading, the serving layout and its forward pass."""
