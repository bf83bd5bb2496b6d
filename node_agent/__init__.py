"""The StudioFleet node agent: serves one model over gRPC and owns its lifecycle."""

__version__ = "0.1.0"
