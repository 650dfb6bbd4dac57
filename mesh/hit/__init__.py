"""Hit affinity: one direct REQ/REP session per Hit, one server thread per Hit."""
