"""The control plane's wire: key names and JSON values in the coordinator's TCPStore.

Why a TCPStore: it ships with torch, runs the same under pytest and on a cluster, gives atomic
counters (peer ids) and the rendezvous store the data plane's gloo/NCCL groups need (a PrefixStore
per membership epoch, as torchft builds its reconfigurable groups). torchft's Lighthouse would add a
Rust service for the same job (heartbeats, quorum); SWARM's DHT is eventually consistent, and a
strict step commit needs one authority. Values are JSON, never pickle.

Keys (all small):
  peers/next              counter: the next peer id
  hello/<id>              a peer's registration {pid, host, applied_step, stage, pending}
  hb/<id>                 a peer's heartbeat counter
  current                 {"round", "step", "attempt"} of the plan in force, or {"done": true}
  plan/<round>            the plan: step, attempt, epoch, stage of each member, routes, state transfers
  vote/<round>/<id>       a member's outcome of the round
  decision/<round>        "commit" (+ gradient norm) or "abort" (+ reason)
A round is one attempt of one step; rounds are numbered once per run (a step redone after a roll-back
gets new keys, never a stale decision).
"""

from __future__ import annotations

import datetime
import json
import time
from typing import Any

import torch.distributed as dist

NEXT_PEER = "peers/next"
CURRENT = "current"


def hello_key(peer: int) -> str:
    return f"hello/{peer}"


def heartbeat_key(peer: int) -> str:
    return f"hb/{peer}"


def plan_key(round_: int) -> str:
    return f"plan/{round_}"


def vote_key(round_: int, peer: int) -> str:
    return f"vote/{round_}/{peer}"


def decision_key(round_: int) -> str:
    return f"decision/{round_}"


def put(store: dist.Store, key: str, value: Any) -> None:
    store.set(key, json.dumps(value))


def get(store: dist.Store, key: str) -> Any | None:
    """The JSON value at key, or None when it is not set (never blocks)."""
    if not store.check([key]):
        return None
    return json.loads(store.get(key))


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"fault_tolerance.coordinator: {address!r} is not host:port")
    return host, int(port)


def host_store(address: str) -> dist.TCPStore:
    """The coordinator's store server."""
    host, port = parse_address(address)
    return dist.TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=30),
                         use_libuv=True)


def connect(address: str, patience_s: float) -> dist.TCPStore:
    """A client of the coordinator's store, retrying while the coordinator (re)starts."""
    host, port = parse_address(address)
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return dist.TCPStore(host, port, is_master=False, wait_for_workers=False,
                                 timeout=datetime.timedelta(seconds=min(30.0, patience_s)))
        except (RuntimeError, OSError, dist.DistStoreError) as err:
            if time.monotonic() > deadline:
                raise ConnectionError(f"no coordinator at {address} after {patience_s:.0f} s: {err}") from None
            time.sleep(0.5)
