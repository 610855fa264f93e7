"""The profiler: a function's throughput and latency under a grid of GPU settings."""
