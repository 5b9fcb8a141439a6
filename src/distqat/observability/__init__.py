"""Observability: what the swarm looks like, live and after the run.

`fleet` aggregates the DHT records per stage and per trainer (pure), `render` draws that view as rich
tables or plain lines, `live` shows it while a launcher runs, `status` prints it once from any machine,
`scalars` and `tensorboard` feed the sinks, `plots` draws a finished run's curves, `logs` tags every
log line with the role and peer, and `call_stats` measures a server's calls.
"""
