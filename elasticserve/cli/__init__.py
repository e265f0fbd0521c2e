"""The `elasticserve` command line."""
