"""Capacity planning (docs/capacity.md): node profiles, the workload of a day, the
discrete-event fleet simulator, costs, and the `fleetctl plan` report built from them."""
