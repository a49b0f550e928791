"""What the game server and the workers both stand on: settings, logging, Redis key names,
the Lua script registry and its runner, the lease, the outbox event formats and the names of
the counters the workers keep for the server's /metrics.

Imports :mod:`games` and libraries only; never :mod:`server` or :mod:`workers` (the
import-linter contracts in pyproject.toml hold it).
"""
