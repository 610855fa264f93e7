"""GPU sharing: discovery, the sharing request, placement and MPS daemon control."""
