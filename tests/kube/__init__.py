"""A Kubernetes API server stand-in that tests drive with the real client and kubectl."""
