"""The launcher: the one package that starts both sides, the game server (:mod:`server`) and
the outbox work (:mod:`workers`). ``python -m stakepro`` is ``make run``."""
