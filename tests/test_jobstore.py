"""The job's lock on S3 (``training/jobstore.py``) against a real S3-compatible server on
127.0.0.1: a live lease refuses a second holder by name, an expired one (its holder died)
is taken over, the holder renews its lease while it runs, and release deletes it."""

from __future__ import annotations

import json
import time

import boto3
import pytest


def test_the_s3_lock_is_a_lease_that_expires_renews_and_goes(s3, monkeypatch, tmp_path):
    from loraplex.errors import InputError
    from loraplex.training import jobstore

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3)
    store = jobstore.JobStore(f"s3://loraplex/{tmp_path.name}")
    client = boto3.client("s3", endpoint_url=s3)
    key = f"{tmp_path.name}/job/job.lock"

    def lease() -> dict:
        return json.loads(client.get_object(Bucket="loraplex", Key=key)["Body"].read())

    # a live lease of another process: refused, its holder named, left in place
    live = {"holder": "pid 1 on elsewhere", "expires": time.time() + 60}
    client.put_object(Bucket="loraplex", Key=key, Body=json.dumps(live).encode())
    refused = pytest.raises(InputError, match=r"job 'job' is already running \(pid 1 on elsewhere")
    with refused, store.lock("job"):
        pass
    assert lease() == live

    # its holder died: once the lease has expired it is taken over, renewed while held
    # (every third of the lease), and deleted on release
    monkeypatch.setattr(jobstore, "LEASE_S", 1.5)
    dead = {"holder": "pid 1 on elsewhere", "expires": time.time() - 1}
    client.put_object(Bucket="loraplex", Key=key, Body=json.dumps(dead).encode())
    with store.lock("job"):
        first = lease()
        assert first["holder"].startswith("pid ") and first["holder"] != dead["holder"]
        time.sleep(2)
        assert lease()["expires"] > first["expires"]  # renewed
        with pytest.raises(InputError, match="is already running"), store.lock("job"):
            pass
    listed = client.list_objects_v2(Bucket="loraplex", Prefix=key).get("Contents", [])
    assert listed == []


def test_two_takers_of_an_expired_s3_lease_one_wins(s3, monkeypatch, tmp_path):
    """Two runs find the same expired lease at once: the conditional write (If-Match on
    the expired lease's ETag) lets exactly one take it; the other is refused."""
    import threading

    from loraplex.errors import InputError
    from loraplex.training import jobstore

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3)
    client = boto3.client("s3", endpoint_url=s3)
    key = f"{tmp_path.name}/race/job.lock"
    dead = {"holder": "pid 1 on elsewhere", "expires": time.time() - 1}

    def take(store: jobstore.JobStore, start: threading.Barrier, outcomes: list[str]) -> None:
        start.wait()
        try:
            with store.lock("race"):
                outcomes.append("won")
                time.sleep(1)  # held while the other one tries
        except InputError as e:
            outcomes.append(f"refused: {e}")

    for attempt in range(3):  # each attempt starts from the same expired lease
        client.put_object(Bucket="loraplex", Key=key, Body=json.dumps(dead).encode())
        store = jobstore.JobStore(f"s3://loraplex/{tmp_path.name}")
        start, outcomes = threading.Barrier(2), []
        takers = [threading.Thread(target=take, args=(store, start, outcomes)) for _ in range(2)]
        for t in takers:
            t.start()
        for t in takers:
            t.join(timeout=60)
        assert sorted(o.split(":")[0] for o in outcomes) == ["refused", "won"], (attempt, outcomes)
        assert "is already running" in next(o for o in outcomes if o != "won")
        assert client.list_objects_v2(Bucket="loraplex", Prefix=key).get("KeyCount", 0) == 0
