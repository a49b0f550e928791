"""StakePro game server: starlette app, player and spectator sockets, HTTP API."""
