"""``scripts/kafka-broker``'s pure helpers (the broker itself is exercised by every Kafka
test through ``scripts/services up``)."""

from __future__ import annotations

import base64

from services_kafka import kb


def test_cluster_ids_never_start_with_a_dash() -> None:
    # ``kafka-storage format -t -abc`` reads a leading-dash id as an option and fails;
    # 1 in 64 random ids did, which failed a CI run. 2,000 draws miss the bug with odds
    # (63/64)**2000 ~ 2e-14 if it came back.
    ids = [kb.new_cluster_id() for _ in range(2_000)]
    assert not [i for i in ids if i.startswith("-")]
    assert len(set(ids)) == len(ids)
    for i in ids[:50]:
        assert len(base64.urlsafe_b64decode(i + "==")) == 16
