"""What is on disk: the instance store and the ledger."""
