"""The node agent: what runs once per node for its GPUs (inventory, MPS daemons, token service,
fault watch). The local backend runs it inside the provider; on Kubernetes it is a DaemonSet."""
