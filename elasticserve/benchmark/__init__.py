"""Serving benchmark: drive any OpenAI-compatible server, measure latency, goodput, shape mix."""
