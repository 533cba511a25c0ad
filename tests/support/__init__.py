"""Helpers shared by the tests: synthetic studies, real node processes, free ports."""
