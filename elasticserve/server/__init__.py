"""The OpenAI-compatible HTTP server over the engine, on one process or on Ray Serve."""
