"""loupe: instance-level image retrieval client SDK and generated gRPC stubs (package loupe.v1)."""

__version__ = "0.1.0"
