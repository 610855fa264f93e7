"""fast-gshare: an OpenFaaS provider that runs inference functions on shared GPUs."""

__version__ = "0.1.0"
