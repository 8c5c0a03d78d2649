"""The local Redis Cluster the store's cluster tests run on: it comes up whole, holds keys across
every shard, and fails a killed master over to its replica with the shard's keys intact."""

from __future__ import annotations

import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster

from monitor.tools.cluster import HASH_SLOTS, LocalCluster

pytestmark = pytest.mark.timeout(60)


def _client(ports: list[int]) -> RedisCluster:
    return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", p) for p in ports], decode_responses=True)


def _assert_whole(rc: RedisCluster) -> None:
    for node, info in rc.cluster_info(target_nodes=RedisCluster.ALL_NODES).items():
        assert info["cluster_state"] == "ok", node
        assert int(info["cluster_slots_assigned"]) == HASH_SLOTS, node


def test_the_url_names_the_three_masters(redis_cluster: LocalCluster) -> None:
    masters = [n for n in redis_cluster.nodes if n.role == "master"]
    assert len(masters) == 3 and len(redis_cluster.nodes) == 3
    assert redis_cluster.url == "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in masters)
    with _client([masters[0].port]) as rc:  # one startup node is enough to find the rest
        _assert_whole(rc)
        assert sorted(n.port for n in rc.get_primaries()) == sorted(n.port for n in masters)


def test_a_killed_master_fails_over_to_its_replica_with_its_keys(make_cluster) -> None:
    cluster = make_cluster(masters=3, replicas=1)
    masters = [n for n in cluster.nodes if n.role == "master"]
    keys = {f"key:{i}": f"value-{i}" for i in range(200)}
    with _client([n.port for n in masters]) as rc:
        _assert_whole(rc)
        assert len(rc.get_primaries()) == 3 and len(rc.get_replicas()) == 3
        for k, v in keys.items():
            rc.set(k, v)
        owner = {k: rc.get_node_from_key(k).port for k in keys}
        assert set(owner.values()) == {n.port for n in masters}
        assert len({rc.keyslot(k) for k in keys}) > 150
        assert rc.mget_nonatomic(list(keys)) == list(keys.values())

    # WAIT counts what this connection wrote, so write one key per shard on a direct connection
    # and WAIT there: the replication stream is ordered, so its ack covers every earlier write.
    for m in masters:
        marker = next(k for k, p in owner.items() if p == m.port)
        with redis.Redis(port=m.port, single_connection_client=True) as direct:
            direct.set(marker, keys[marker])
            assert direct.wait(1, 5000) == 1

    victim = masters[0]
    replica = next(n for n in cluster.nodes if n.master_id == victim.node_id)
    cluster.kill(victim.port)
    assert cluster.wait_failover(victim.port, timeout_s=15) == replica.port
    assert cluster.node(replica.port).role == "master"

    live = [n.port for n in cluster.nodes if n.alive]
    with _client(live) as rc:
        _assert_whole(rc)
        on_victim = [k for k, p in owner.items() if p == victim.port]
        assert on_victim and {rc.get_node_from_key(k).port for k in on_victim} == {replica.port}
        assert [rc.get(k) for k in on_victim] == [keys[k] for k in on_victim]
        assert rc.mget_nonatomic(list(keys)) == list(keys.values())
