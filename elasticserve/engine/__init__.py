"""The engine: requests, the scheduler and its KV blocks, the model runner, sampling, outputs."""
