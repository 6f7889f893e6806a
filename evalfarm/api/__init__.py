"""HTTP API of the farm: JSON over the same `Client` the CLI uses. Standard library only."""
