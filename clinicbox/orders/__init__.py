"""The orders room: orders and their scheduled procedure steps, the worklist, MPPS."""
