"""Everything a client or server does with DNS: resolve and register."""
