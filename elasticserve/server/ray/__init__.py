"""Many engine replicas behind one OpenAI endpoint, on Ray Serve."""
