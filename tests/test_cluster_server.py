"""The game server on a real Redis Cluster (tests/rediscluster.py; docs/cluster.md)."""

from __future__ import annotations

import httpx

from plumbing.settings import Settings
from tests.conftest import ADMIN_TOKEN, serve
from tests.helpers import Api


async def test_smoke(cluster_settings: Settings) -> None:
    async with serve(cluster_settings) as one, Api(one.address, ADMIN_TOKEN) as api:
        uid, token = await api.player(deposit="10.00")
        assert (await api.user(uid))["balances"]["USDT"] == "10.00"
        async with api.play(token) as p:
            reply = await p.bet("1.00", "50.00")
            assert reply["type"] == "bet_result", reply
        async with httpx.AsyncClient(base_url=f"http://{one.address}") as http:
            for path in ("/healthz", "/metrics"):
                r = await http.get(path)
                assert r.status_code == 200, (path, r.text)
        r = await api.http.post(f"/api/admin/users/{uid}/revoke")
        assert r.status_code == 200, r.text
