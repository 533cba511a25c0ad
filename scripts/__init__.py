"""Set-up, test, demo and benchmark commands of the repository (not part of the node)."""
