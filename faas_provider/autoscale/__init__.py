"""The autoscaler: each function's GPU setting and replicas from its rate and its profile."""
