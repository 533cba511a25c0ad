"""HTTP edge: one module per role, assembled in app.py."""
