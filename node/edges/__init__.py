"""How the world reaches the node: HTTP, DIMSE, command line."""
