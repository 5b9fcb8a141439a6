"""How a peer talks to the swarm: DHT records, the stage RPC, routing and pipeline counting."""
