"""A wal2cache client in Python: the subscriber protocol and the lease protocol.

Two small classes an application can copy:

- ``Subscriber``: an in-process cache evicted by the daemon's Kafka events (schema 1):
  every partition assigned, from the end; keys and tagged keys evicted; emptied on
  ``flush_all``, on an offset gap, on a consumer error and when a partition has had no
  heartbeat for longer than ``staleness``; a load that began before an invalidation of
  its key or tags is not inserted.
- ``L2``: Redis look-aside with leases, through the Lua scripts in ``src/l2/lua/``
  (the same files ``wal2cache::l2`` runs): no stale set, no stampede, tags registered
  for the daemon's purges, negative caching.

``python wal2cache_client.py demo`` reads product 1 of the demo every second through
both; ``python wal2cache_client.py check ...`` is the protocol check that
``tests/other_languages.rs`` drives against the running daemon.
"""

import argparse
import json
import os
import secrets
import sys
import threading
import time

import redis
from confluent_kafka import OFFSET_END, Consumer, KafkaError, TopicPartition
from redis.crc import key_slot

LUA_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "src", "l2", "lua")
NOT_FOUND = b"\0wal2cache:not-found"


def lease_key(key: str) -> str:
    """The lease sidecar of ``key``, in the same Redis Cluster slot."""
    return sidecar_key(key, "l")


def version_key(key: str) -> str:
    """The version sidecar the daemon writes for ``key``, in the same slot."""
    return sidecar_key(key, "v")


def sidecar_key(key: str, suffix: str) -> str:
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return f"{key}:w2c:{suffix}"
    if key and "}" not in key:
        return f"{{{key}}}:w2c:{suffix}"
    # The whole key is hashed: a short tag of the same slot goes in front.
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyz"
    slot = key_slot(key.encode())
    for length in range(1, 5):
        for n in range(len(alphabet) ** length):
            tag, m = "", n
            for _ in range(length):
                tag += alphabet[m % len(alphabet)]
                m //= len(alphabet)
            if key_slot(tag.encode()) == slot:
                return f"{{{tag}}}{key}:w2c:{suffix}"
    raise AssertionError("36^4 tags cover every slot")


class LeaseWait(Exception):
    pass


class L2:
    """Look-aside caching on the daemon's Redis with leases (one server)."""

    def __init__(self, client, tag_prefix="tag:", lease_ttl_ms=5000, lease_wait_s=2.0,
                 negative_ttl_ms=10000):
        self.r = client
        self.tag_prefix = tag_prefix
        self.lease_ttl_ms = lease_ttl_ms
        self.lease_wait_s = lease_wait_s
        self.negative_ttl_ms = negative_ttl_ms
        scripts = {}
        for name in ("fetch", "store", "release"):
            with open(os.path.join(LUA_DIR, f"{name}.lua")) as f:
                scripts[name] = client.register_script(f.read())
        self.fetch, self.store, self.release = (
            scripts["fetch"], scripts["store"], scripts["release"])
        self.counts = {"hits": 0, "misses": 0, "granted": 0, "lost": 0, "stored": 0,
                       "skipped": 0, "waits": 0, "negative_hits": 0}

    def look(self, key, token, tags):
        """One call of fetch.lua: ("hit", value) | ("granted", None) | ("held", pttl)."""
        sets = [self.tag_prefix + t for t in tags]
        reply = self.fetch(keys=[key, lease_key(key), version_key(key)] + sets,
                           args=[token, self.lease_ttl_ms])
        kind = {1: "hit", 2: "granted", 3: "held"}[reply[0]]
        return kind, (reply[1] if len(reply) > 1 else None)

    def put(self, key, token, value, ttl_ms):
        """One call of store.lua: 1 stored, 0 lease lost, 2 a value was there."""
        if value is None:
            value, ttl_ms = NOT_FOUND, self.negative_ttl_ms
        return self.store(keys=[key, lease_key(key), version_key(key)],
                          args=[token, value, ttl_ms or 0])

    def get_or_load(self, key, tags, ttl_ms, loader):
        token = secrets.token_hex(16)
        deadline = time.monotonic() + self.lease_wait_s
        pause, first = 0.001, True
        while True:
            kind, value = self.look(key, token, tags)
            if kind == "hit":
                if value == NOT_FOUND:
                    self.counts["negative_hits"] += 1
                    return None
                self.counts["hits" if first else "waits"] += 1
                return value
            if first:
                self.counts["misses"] += 1
            if kind == "granted":
                self.counts["granted"] += 1
                try:
                    loaded = loader()
                except Exception:
                    self.release(keys=[lease_key(key)], args=[token])
                    raise
                stored = self.put(key, token, loaded, ttl_ms)
                self.counts[{1: "stored", 0: "lost", 2: "skipped"}[stored]] += 1
                return loaded
            if time.monotonic() >= deadline:
                return loader()  # load without storing
            time.sleep(pause)
            pause = min(pause * 2, 0.02)
            first = False


class Subscriber:
    """An in-process cache evicted by the daemon's events."""

    def __init__(self, brokers, topic, staleness_s=5.0, properties=None):
        self.topic = topic
        self.staleness_s = staleness_s
        self.values = {}  # key -> value
        self.tags = {}  # tag -> set of keys
        self.generation = 0  # bumped by every eviction and flush
        self.invalidated = {}  # key or "tag:" + tag -> generation of its last eviction
        self.healthy = False
        self.events = []
        self.lock = threading.Lock()
        conf = {"bootstrap.servers": brokers, "group.id": "unused",
                "enable.auto.commit": False, "enable.partition.eof": False}
        conf.update(properties or {})
        self.consumer = Consumer(conf)
        meta = self.consumer.list_topics(topic, timeout=10)
        partitions = sorted(meta.topics[topic].partitions)
        if not partitions:
            raise RuntimeError(f"topic {topic} has no partitions")
        # Every partition, from the end: no consumer group, the cache starts empty.
        self.consumer.assign([TopicPartition(topic, p, OFFSET_END) for p in partitions])
        self.next_offset = {}
        self.heard = {p: None for p in partitions}
        self.stop = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def flush(self, why):
        with self.lock:
            self.values.clear()
            self.tags.clear()
            self.generation += 1
            self.invalidated.clear()
            self.invalidated["*"] = self.generation
            self.healthy = False
            self.events.append({"flushed": why})

    def run(self):
        while not self.stop:
            msg = self.consumer.poll(0.1)
            now = time.monotonic()
            if self.healthy and any(t is None or now - t > self.staleness_s
                                    for t in self.heard.values()):
                self.flush("heartbeat silence")
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() != KafkaError._PARTITION_EOF:
                    self.flush(f"consumer error: {msg.error()}")
                continue
            p, offset = msg.partition(), msg.offset()
            expected = self.next_offset.get(p)
            self.next_offset[p] = offset + 1
            if expected is not None and offset != expected:
                self.flush(f"offset gap on partition {p}: {expected} -> {offset}")
            try:
                event = json.loads(msg.value())
            except (TypeError, ValueError):
                continue
            if event.get("schema") != 1:
                continue
            kind = event.get("kind")
            if kind == "heartbeat":
                self.heard[p] = now
                with self.lock:
                    if all(t is not None and now - t <= self.staleness_s
                           for t in self.heard.values()):
                        self.healthy = True
            elif kind == "invalidate":
                with self.lock:
                    self.generation += 1
                    for k in event.get("keys", []):
                        self.values.pop(k, None)
                        self.invalidated[k] = self.generation
                    for t in event.get("tags", []):
                        for k in self.tags.pop(t, set()):
                            self.values.pop(k, None)
                        self.invalidated["tag:" + t] = self.generation
                    self.events.append(event)
            elif kind == "flush_all":
                self.flush(event.get("reason", "flush_all"))

    def get_with(self, key, tags, loader):
        with self.lock:
            if key in self.values:
                return self.values[key]
            began = self.generation
        value = loader()
        with self.lock:
            seen = [self.invalidated.get(key, 0), self.invalidated.get("*", 0)]
            seen += [self.invalidated.get("tag:" + t, 0) for t in tags]
            # Not inserted when an invalidation came while it loaded, or unhealthy.
            if self.healthy and max(seen) <= began:
                self.values[key] = value
                for t in tags:
                    self.tags.setdefault(t, set()).add(key)
        return value

    def close(self):
        self.stop = True
        self.thread.join()
        self.consumer.close()


def say(**fields):
    print(json.dumps(fields), flush=True)


def check(args):
    """The protocol against the running daemon; the Rust test drives the database
    through stdin/stdout: each "wait" line is answered once the test has written."""
    r = redis.Redis.from_url(args.redis)
    # A lease far longer than the check: only the daemon can end it.
    l2 = L2(r, tag_prefix=args.tag_prefix, lease_ttl_ms=120000)
    sub = Subscriber(args.brokers, args.topic, properties=dict(args.property))
    deadline = time.monotonic() + 30
    while not sub.healthy:
        if time.monotonic() > deadline:
            raise SystemExit("no heartbeat on every partition within 30 s")
        time.sleep(0.05)
    say(step="healthy")
    p = args.prefix
    one, two, three = f"{p}:item:1", f"{p}:item:2", f"{p}:item:3"
    tag = f"{p}:items"

    loads = []
    v = l2.get_or_load(one, [tag], 60000, lambda: loads.append(1) or b"row 1")
    again = l2.get_or_load(one, [tag], 60000, lambda: loads.append(1) or b"again")
    members = sorted(m.decode() for m in r.smembers(args.tag_prefix + tag))
    say(step="l2", value=v.decode(), again=again.decode(), loads=len(loads),
        members=members, lease_key=lease_key(one))

    # A lease taken, then the row changes: the daemon removes the key's lease.
    token = secrets.token_hex(16)
    kind, _ = l2.look(two, token, [])
    say(step="leased", kind=kind)
    sys.stdin.readline()  # the test updated row 2 and the daemon applied it
    say(step="store_after_change", stored=l2.put(two, token, b"stale", 60000),
        exists=r.exists(two))

    # Negative caching.
    none = l2.get_or_load(three, [], 60000, lambda: None)
    none_again = l2.get_or_load(three, [], 60000, lambda: b"not called")
    say(step="negative", value=none, again=none_again, marker=r.get(three) == NOT_FOUND)

    # The subscriber: cached, then evicted by the event of the row's update.
    sub.get_with(one, [tag], lambda: "row 1")
    say(step="l1_cached", cached=one in sub.values)
    sys.stdin.readline()  # the test updated row 1
    deadline = time.monotonic() + 30
    while one in sub.values and time.monotonic() < deadline:
        time.sleep(0.01)
    event = next((e for e in sub.events if one in e.get("keys", [])), None)
    say(step="l1_evicted", evicted=one not in sub.values, event=event)
    sub.close()


def demo(args):
    r = redis.Redis.from_url(args.redis)
    l2 = L2(r, tag_prefix="tag:")
    sub = Subscriber(args.brokers, args.topic, properties=dict(args.property))
    loads = 0
    for _ in range(60):
        def from_db():
            nonlocal loads
            loads += 1
            return f"product 1, load #{loads}".encode()  # your database query here
        value = sub.get_with("shop:product:v3:1", ["shop:category:1"],
                             lambda: l2.get_or_load("shop:product:v3:1", ["shop:category:1"],
                                                    3600000, from_db))
        print(value, "healthy" if sub.healthy else "unhealthy", l2.counts, flush=True)
        time.sleep(1)
    sub.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["demo", "check", "lease-keys"])
    parser.add_argument("--redis", default="redis://127.0.0.1:63790/0")
    parser.add_argument("--brokers", default="127.0.0.1:19092")
    parser.add_argument("--topic", default="wal2cache.invalidations")
    parser.add_argument("--prefix", default="")
    parser.add_argument("--tag-prefix", default="tag:")
    parser.add_argument("--property", action="append", default=[],
                        type=lambda kv: tuple(kv.split("=", 1)),
                        help="a librdkafka property, k=v (repeatable)")
    parser.add_argument("keys", nargs="*", help="lease-keys: the keys to name")
    args = parser.parse_args()
    if args.mode == "lease-keys":
        for key in args.keys:
            say(key=key, lease=lease_key(key))
    else:
        (check if args.mode == "check" else demo)(args)


if __name__ == "__main__":
    main()
