"""The time-quota gate: the per-GPU token scheduler, its service and the per-replica proxy."""
