"""What every StudioFleet role shares: contracts, config, the client library and fleetctl."""
