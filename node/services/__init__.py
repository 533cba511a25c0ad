"""What the node does, over core and store."""
