"""Balance policies as transcripts (pure; no sockets)."""

import csv
import os
import random
from collections import Counter

from gproxy.balancer import BALANCERS, ConsistentHash, LeastConn, Random, RoundRobin

DATA = os.path.join(os.path.dirname(__file__), "data")
GOLDEN = os.path.join(DATA, "nginx-ketama-golden-sample.csv")   # provenance: its README


def everyone(i):
    return True


def test_smooth_weighted_round_robin_matches_nginx_sequence():
    # nginx's own example (ngx_http_upstream_round_robin.c): weights 5, 1, 1
    rr = RoundRobin([5, 1, 1])
    seq = "".join("abc"[rr.choose(everyone)] for _ in range(7))
    assert seq == "aabacaa"


def test_round_robin_honours_weights_and_skips_unusable():
    rr = RoundRobin([1, 2, 3])
    counts = Counter(rr.choose(everyone) for _ in range(600))
    assert counts == {0: 100, 1: 200, 2: 300}
    counts = Counter(rr.choose(lambda i: i != 2) for _ in range(300))
    assert counts == {0: 100, 1: 200}
    assert rr.choose(lambda i: False) is None


def test_least_conn_prefers_fewest_inflight_and_breaks_ties_round_robin():
    inflight = [3, 1, 1]
    lc = LeastConn([1, 1, 1], inflight)
    picks = [lc.choose(everyone) for _ in range(4)]
    assert sorted(set(picks)) == [1, 2] and picks.count(1) == 2 and picks.count(2) == 2
    inflight[1] = 0
    assert lc.choose(everyone) == 1
    assert lc.choose(lambda i: i == 0) == 0


def test_least_conn_weights_scale_the_load():
    inflight = [2, 3]
    lc = LeastConn([1, 4], inflight)    # 2/1 > 3/4
    assert lc.choose(everyone) == 1


def test_random_two_choices_picks_the_less_loaded_of_two():
    inflight = [10, 0, 10]
    r = Random([1, 1, 1], inflight, rng=random.Random(7))
    picks = Counter(r.choose(everyone) for _ in range(1000))
    # backend 1 wins whenever it is one of the two draws: far above 1/3
    assert picks[1] > 500, picks
    assert r.choose(lambda i: i == 2) == 2
    assert r.choose(lambda i: False) is None


def test_consistent_hash_reproduces_every_nginx_golden_row():
    servers = [f"10.0.0.{i}:443" for i in range(1, 10)]
    ch = ConsistentHash([100] * 9, servers=servers)
    rows = list(csv.reader(open(GOLDEN)))
    assert len(rows) == 1001
    wrong = [(uri, addr, servers[ch.owner(uri.encode())]) for uri, addr in rows
             if servers[ch.owner(uri.encode())] != addr]
    assert wrong == [], f"{len(wrong)} rows differ, first: {wrong[:3]}"


def test_removing_a_backend_moves_only_its_keys():
    servers = [f"192.168.1.{i}:80" for i in range(1, 6)]
    full = ConsistentHash([1] * 5, servers=servers)
    less = ConsistentHash([1] * 4, servers=servers[:2] + servers[3:])
    moved = kept = 0
    for n in range(5000):
        key = f"/user/{n}".encode()
        before = servers[full.owner(key)]
        after = (servers[:2] + servers[3:])[less.owner(key)]
        if before == servers[2]:
            moved += 1
        else:
            assert after == before, f"key {key!r} moved from {before} to {after}"
            kept += 1
    assert moved > 500 and kept > 3000


def test_consistent_hash_walks_past_an_unusable_owner_like_removal():
    servers = ["a.example:80", "b.example:80", "c.example:80"]
    ch = ConsistentHash([1, 1, 1], servers=servers)
    for n in range(500):
        key = f"k{n}".encode()
        owner = ch.owner(key)
        alt = ch.choose(lambda i: i != owner, key)
        assert alt != owner and alt is not None


def test_consistent_hash_empty_key_falls_back_to_round_robin():
    ch = ConsistentHash([1, 1, 1], servers=["a:1", "b:1", "c:1"])
    assert [ch.choose(everyone, b"") for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    assert [ch.choose(everyone, None) for _ in range(3)] == [0, 1, 2]


def test_consistent_hash_weight_multiplies_points():
    ch = ConsistentHash([1, 3], servers=["a:1", "b:1"])
    counts = Counter(ch.owner(f"key{n}".encode()) for n in range(20000))
    assert 2.3 < counts[1] / counts[0] < 3.9, counts


def test_table_names_every_policy():
    assert set(BALANCERS) == {"round_robin", "least_conn", "random", "consistent_hash"}
