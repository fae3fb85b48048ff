"""The runtime: bounded channels, in-band messages and the executor that runs stages."""
