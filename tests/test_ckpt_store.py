"""Checkpoint store over S3 (moto's S3-compatible server on loopback) and the local default."""

from __future__ import annotations

import json
import time

import pytest

from pruning.manifest import MANIFEST, CorruptCheckpoint, Manifest, sha256_file
from service.npcs.checkpoints import CheckpointStore
from tests.conftest import free_port, require_module


@pytest.fixture(scope="module")
def s3(monkeypatch_module=None):
    import os

    moto_server = require_module("moto.server")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket="npcs")
    yield f"http://127.0.0.1:{port}"
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _checkpoint(d):
    d.mkdir()
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 1000)
    (d / "config.json").write_text(json.dumps({"intermediate_size": 8}))
    files = {f.name: sha256_file(f) for f in d.iterdir()}
    (d / MANIFEST).write_text(json.dumps({"files": files}))
    (d / MANIFEST).write_text(json.dumps({"files": files}))
    return d


def test_local_store_is_the_directory(tmp_path):
    d = _checkpoint(tmp_path / "npc-1")
    store = CheckpointStore(None, tmp_path / "cache")
    assert store.publish(d, "npc-1") == str(d)
    assert store.fetch(str(d)) == d
    Manifest.verify(d)


@pytest.mark.parametrize("url", ["{d}", "file://{d}"])
def test_directory_store_publishes_into_new_folders(tmp_path, url):
    """NPC_STORE_URL as a shared directory (a path, or a file:// URL): the NPC's folder is created."""
    d = _checkpoint(tmp_path / "npc-3")
    store = CheckpointStore(url.format(d=tmp_path / "shared"), tmp_path / "cache")
    ref = store.publish(d, "npc-3")
    local = store.fetch(ref)
    assert (local / "model.safetensors").read_bytes() == (d / "model.safetensors").read_bytes()
    Manifest.verify(local)
    store.delete(ref)
    assert not (tmp_path / "shared" / "npc-3").exists()


def test_s3_publish_fetch_verify(tmp_path, s3):
    d = _checkpoint(tmp_path / "npc-2")
    opts = {"client_kwargs": {"endpoint_url": s3}}
    store = CheckpointStore("s3://npcs/prod", tmp_path / "cache", opts)
    ref = store.publish(d, "npc-2")
    assert ref == "s3://npcs/prod/npc-2"
    local = store.fetch(ref)
    assert local != d and (local / "model.safetensors").read_bytes() == (d / "model.safetensors").read_bytes()
    Manifest.verify(local)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]

    # another host's cache: a corrupted object in the store is refused, nothing half-written is kept
    import fsspec

    fs, _ = fsspec.core.url_to_fs(ref, **opts)
    fs.pipe_file("npcs/prod/npc-2/model.safetensors", b"garbage")
    other = CheckpointStore("s3://npcs/prod", tmp_path / "cache2", opts)
    with pytest.raises(CorruptCheckpoint, match="sha256"):
        other.fetch(ref)
    assert not (tmp_path / "cache2" / "npc-2").exists()
    assert not [p for p in (tmp_path / "cache2").iterdir()]

    # no manifest = not committed: never fetched
    fs.rm("npcs/prod/npc-2/manifest.json")
    with pytest.raises(CorruptCheckpoint, match="missing"):
        CheckpointStore("s3://npcs/prod", tmp_path / "cache3", opts).fetch(ref)

    store.delete(ref)
    assert not fs.exists("npcs/prod/npc-2")


def test_a_manifest_naming_files_outside_the_checkpoint_is_refused(tmp_path):
    """A store is another host's word: a manifest listing '../x' must not make a fetch write there."""
    from pruning.manifest import CorruptCheckpoint

    d = _checkpoint(tmp_path / "npc-4")
    store = CheckpointStore(f"file://{tmp_path / 'shared'}", tmp_path / "cache" / "deep")
    ref = store.publish(d, "npc-4")
    (tmp_path / "shared" / "escaped").write_text("planted")
    (tmp_path / "shared" / "npc-4" / MANIFEST).write_text(json.dumps({"files": {"../escaped": "0" * 64}}))
    with pytest.raises(CorruptCheckpoint, match="plain name"):
        store.fetch(ref)
    assert not (tmp_path / "cache" / "escaped").exists() and not list((tmp_path / "cache").rglob("escaped"))
    bad = _checkpoint(tmp_path / "npc-5")
    (bad / MANIFEST).write_text(json.dumps({"files": {"/etc/hostname": "0" * 64}}))
    with pytest.raises(CorruptCheckpoint, match="plain name"):
        Manifest.verify(bad)


def test_publish_waits_out_a_store_that_is_down(tmp_path, s3):
    """The store is unreachable when the publish starts (nothing listens on its port) and comes up
    2 s later: the publish backs off and succeeds instead of failing the NPC."""
    import threading

    moto_server = require_module("moto.server")
    port = free_port()
    late = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)  # same in-process buckets
    timer = threading.Timer(2.0, late.start)
    timer.start()
    try:
        d = _checkpoint(tmp_path / "npc-5")
        opts = {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
                "config_kwargs": {"retries": {"max_attempts": 1}}}
        store = CheckpointStore("s3://npcs/late", tmp_path / "cache", opts)
        t0 = time.monotonic()
        ref = store.publish(d, "npc-5.a1", wait_max_s=2.0)
        assert time.monotonic() - t0 >= 1.5  # it did wait for the store
        Manifest.verify(store.fetch(ref))
        from botocore.exceptions import EndpointConnectionError

        gone = {**opts, "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{free_port()}"}}
        with pytest.raises(EndpointConnectionError):  # a store that never comes back: its error, after the tries
            CheckpointStore("s3://npcs/late", tmp_path / "c2", gone).publish(d, "npc-6", tries=2, wait_max_s=0.1)
    finally:
        timer.join()
        late.stop()
