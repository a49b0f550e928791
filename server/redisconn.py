"""The run id of the Redis server the bet path talks to.

Redis gives a new ``run_id`` to every start. bet-n.lua compares the run id stored with the
user's seed pair against the one the server passes in: a pair installed before a restart
(which may have lost the last writes, and so may hand out a nonce whose roll a player has
already seen) is rotated before its next bet. Every script that needs it goes through
:class:`server.resp.FastConnection`, which reads the run id on every (re)connect before
sending anything else, so a script never reaches a restarted Redis with the run id of the
previous one. (The general redis-py client and the pub/sub connection need no such hook; a
hook that reads a reply would race the pub/sub reader when that connection reconnects.)
"""

from __future__ import annotations


class _RunIdArg(str):
    """The type of :data:`RUN_ID`."""


#: Placeholder for the run id in a script's arguments: the connection that sends the script
#: puts the run id of the server it is connected to in its place at send time (the value
#: known when the arguments were built could predate a reconnect to a restarted Redis).
RUN_ID = _RunIdArg("<run id>")


class RunId:
    def __init__(self) -> None:
        self.value = ""

    def update(self, info_server: str) -> None:
        """Take the run id from the text of ``INFO server``."""
        for line in info_server.splitlines():
            if line.startswith("run_id:"):
                self.value = line[len("run_id:"):].strip()
                return
