"""`fleetctl`, the operator's CLI."""
