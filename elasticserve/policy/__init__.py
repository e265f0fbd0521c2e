"""Shape policies: which shape serves each request, from the step-time model and the load."""
