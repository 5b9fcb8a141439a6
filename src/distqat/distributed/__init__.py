"""The roles: monitor, client, trainer and stage server, each wiring swarm/, models/ and data to a process."""
