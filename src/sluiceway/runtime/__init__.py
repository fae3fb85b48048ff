"""The runtime: the executor that runs stages, the handle, checkpoint coordination, load."""
