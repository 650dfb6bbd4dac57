"""The bundled DNS responder: authoritative, RFC 2136 updates, leases."""
