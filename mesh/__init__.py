"""srvmesh: a ZeroMQ service mesh whose only directory is DNS."""

__version__ = "0.1.0"
