"""The StudioFleet coordinator: discovery, health, routing, failover, rollouts, audit.

Not built yet (the coordinator issue comes after the node agent). It will meet node
agents only on the wire, through the contracts in cluster.api.
"""
