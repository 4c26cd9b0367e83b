"""The real gs:// clients this project uses, run in subprocesses against a local GCS emulator.

Nothing is mocked: each test starts a fresh Python process with `Emulator.env` applied, the
unmodified client library (etils.epath, tf.io.gfile / tf.summary, tensorstore, orbax, clu) speaks
HTTP to the emulator on 127.0.0.1, and the test then checks what landed in the bucket through the
emulator's JSON API (`gcs_emulator.list_objects`, independent of the clients) and that it reads back
equal. See tests/gcs_emulator.py for how each client is pointed at the emulator.
"""
from __future__ import annotations

import hashlib
import http.client
import importlib.util
import json
import os
import ssl
import sys
import textwrap

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("gcp_storage_emulator",
                    reason="gcp-storage-emulator is not installed (pip install gcp-storage-emulator)")

from gcs_emulator import gcs_emulator  # noqa: E402,F401  (the session-scoped fixture)

pytestmark = pytest.mark.slow  # the fast tier (-m 'not slow') leaves this module out

RESULT = "RESULT "


def run_client(emulator, code: str, *args: str, timeout: float = 90.0) -> dict:
    """Runs `code` in a fresh interpreter with the emulator's env; returns its `RESULT {json}` line."""
    code = "import sys\nsys.argv[1:] = " + repr(list(args)) + "\n" + textwrap.dedent(code)
    proc = emulator.run_python(code, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"client subprocess failed (exit {proc.returncode})\n--- stdout ---\n{proc.stdout[-4000:]}"
                    f"\n--- stderr ---\n{proc.stderr[-8000:]}\n--- emulator log ---\n"
                    f"{emulator.log_text(6000)}")
    return json.loads(lines[-1][len(RESULT):])


def files_under(emulator, prefix: str) -> dict[str, int]:
    """{name relative to prefix: size} of the objects under gs://bucket/prefix, directory markers left out."""
    return {item["name"][len(prefix):]: int(item["size"]) for item in emulator.list_objects(prefix)
            if not item["name"].endswith("/")}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------ etils.epath

EPATH = """
    import json, os, time
    from etils import epath
    root = epath.Path(sys.argv[1])
    out = {"backend": type(root._backend).__name__}
    (root / "sub" / "deep").mkdir(parents=True, exist_ok=True)
    (root / "sub" / "deep" / "a.txt").write_text("alpha")
    (root / "b.bin").write_bytes(bytes(range(256)) * 3)
    (root / "trash" / "t").mkdir(parents=True)
    (root / "trash" / "t" / "x.txt").write_text("x")
    out["read_text"] = (root / "sub" / "deep" / "a.txt").read_text()
    out["read_bytes_sha"] = __import__("hashlib").sha256((root / "b.bin").read_bytes()).hexdigest()
    out["exists"] = [(root / "b.bin").exists(), (root / "missing").exists(), (root / "sub").exists()]
    out["is_dir"] = [(root / "sub").is_dir(), (root / "b.bin").is_dir()]
    out["is_file"] = [(root / "b.bin").is_file(), (root / "sub").is_file()]
    out["iterdir"] = sorted(p.name for p in root.iterdir())
    out["glob"] = sorted(os.fspath(p) for p in root.glob("sub/*/*.txt"))
    st = (root / "b.bin").stat()
    out["stat"] = {"length": st.length, "mtime": st.mtime, "is_directory": st.is_directory, "now": time.time()}
    (root / "b.bin").rename(root / "c.bin")
    (root / "x.tmp").write_text("replaced")
    (root / "x.tmp").replace(root / "sub" / "deep" / "a.txt")
    try:
        (root / "c.bin").rename(root / "sub" / "deep" / "a.txt")
        out["rename_onto_existing"] = "no error"
    except FileExistsError as error:
        out["rename_onto_existing"] = "FileExistsError"
    (root / "gone.txt").write_text("bye")
    (root / "gone.txt").unlink()
    (root / "trash").rmtree()
    out["after"] = {"trash": (root / "trash").exists(), "b.bin": (root / "b.bin").exists(),
                    "x.tmp": (root / "x.tmp").exists(), "a.txt": (root / "sub/deep/a.txt").read_text()}
    print("RESULT " + json.dumps(out))
"""


def test_epath(gcs_emulator):
    prefix = "epath/run/"
    out = run_client(gcs_emulator, EPATH, f"gs://{gcs_emulator.bucket}/{prefix}".rstrip("/"))
    assert out["backend"] == "_TfBackend"  # etils 1.15 picks tf.io.gfile for gs:// when TF is installed
    payload = bytes(range(256)) * 3
    assert out["read_text"] == "alpha" and out["read_bytes_sha"] == sha256(payload)
    assert out["exists"] == [True, False, True]
    assert out["is_dir"] == [True, False] and out["is_file"] == [True, False]
    assert out["iterdir"] == ["b.bin", "sub", "trash"]
    assert out["glob"] == [f"gs://{gcs_emulator.bucket}/{prefix}sub/deep/a.txt"]
    assert out["stat"]["length"] == len(payload) and not out["stat"]["is_directory"]
    assert abs(out["stat"]["mtime"] - out["stat"]["now"]) < 120  # whole seconds, from the object's 'updated'
    assert out["rename_onto_existing"] == "FileExistsError"
    assert out["after"] == {"trash": False, "b.bin": False, "x.tmp": False, "a.txt": "replaced"}

    # What the emulator holds: exactly the two surviving files, plus tf.io.gfile's directory markers.
    assert files_under(gcs_emulator, prefix) == {"c.bin": len(payload), "sub/deep/a.txt": len("replaced")}
    assert gcs_emulator.read_object(prefix + "c.bin") == payload
    assert gcs_emulator.read_object(prefix + "sub/deep/a.txt") == b"replaced"
    names = gcs_emulator.object_names(prefix)
    assert prefix + "sub/" in names and prefix + "sub/deep/" in names
    assert not any("trash" in name or "gone" in name or "x.tmp" in name for name in names)


# ------------------------------------------------------------------------- tf.io.gfile, tf.summary

TF_GFILE = """
    import hashlib, json
    import tensorflow as tf
    base = sys.argv[1]
    gfile = tf.io.gfile
    gfile.makedirs(base + "/data")
    with gfile.GFile(base + "/data/blob.bin", "wb") as f:
        f.write(b"\\x00tf-bytes\\xff" * 1000)
    with gfile.GFile(base + "/data/blob.bin", "rb") as f:
        blob = f.read()
    out = {"blob_sha": hashlib.sha256(blob).hexdigest(), "exists": gfile.exists(base + "/data/blob.bin"),
           "size": gfile.stat(base + "/data/blob.bin").length, "listdir": sorted(gfile.listdir(base + "/data"))}
    writer = tf.summary.create_file_writer(base + "/logs")
    with writer.as_default():
        for step in range(3):
            tf.summary.scalar("loss", 1.0 / (step + 1), step=step)
    writer.flush()
    writer.close()
    events = gfile.glob(base + "/logs/events.out.tfevents.*")
    scalars = []
    for record in tf.data.TFRecordDataset(events):
        event = tf.compat.v1.Event.FromString(record.numpy())
        for value in event.summary.value:
            scalars.append([value.tag, event.step, float(tf.make_ndarray(value.tensor))])
    with gfile.GFile(events[0], "rb") as f:
        out["event_sha"] = hashlib.sha256(f.read()).hexdigest()
    out.update(events=[e.rsplit("/", 1)[1] for e in events], scalars=scalars)
    print("RESULT " + json.dumps(out))
"""


def test_tf_gfile_and_summary_writer(gcs_emulator):
    prefix = "tf/run/"
    out = run_client(gcs_emulator, TF_GFILE, f"gs://{gcs_emulator.bucket}/{prefix}".rstrip("/"))
    blob = b"\x00tf-bytes\xff" * 1000
    assert out["exists"] and out["size"] == len(blob) and out["listdir"] == ["blob.bin"]
    assert out["blob_sha"] == sha256(blob)
    assert out["scalars"] == [["loss", 0, 1.0], ["loss", 1, 0.5], ["loss", 2, pytest.approx(1 / 3)]]

    files = files_under(gcs_emulator, prefix)
    assert len(out["events"]) == 1 and set(files) == {"data/blob.bin", "logs/" + out["events"][0]}
    assert gcs_emulator.read_object(prefix + "data/blob.bin") == blob
    assert sha256(gcs_emulator.read_object(prefix + "logs/" + out["events"][0])) == out["event_sha"]


# ------------------------------------------------------------------------------------- tensorstore

TENSORSTORE = """
    import json
    import numpy as np
    import tensorstore as ts
    bucket, prefix = sys.argv[1], sys.argv[2]
    kv = ts.KvStore.open({"driver": "gcs", "bucket": bucket, "path": prefix + "kv/"}).result()
    kv.write("a", b"value-a").result()
    kv.write("nested/b", b"value-b" * 100).result()
    kv.write("empty", b"").result()
    kv.write("doomed", b"x").result()
    kv.delete_range(ts.KvStore.KeyRange("doomed", "doomed\\x00")).result()
    out = {"read": {k: kv.read(k).result().value.decode() for k in ("a", "empty")},
           "missing": kv.read("doomed").result().state,
           "list": sorted(k.decode() for k in kv.list().result())}
    spec = {"driver": "zarr", "kvstore": {"driver": "gcs", "bucket": bucket, "path": prefix + "arr/"}}
    metadata = {"shape": [6, 4], "chunks": [3, 4], "dtype": "<f4"}
    array = ts.open({**spec, "metadata": metadata}, create=True).result()
    array[...] = np.arange(24, dtype=np.float32).reshape(6, 4)
    out["array"] = ts.open(spec).result().read().result().tolist()
    print("RESULT " + json.dumps(out))
"""


def test_tensorstore_gcs_kvstore(gcs_emulator):
    prefix = "ts/run/"
    out = run_client(gcs_emulator, TENSORSTORE, gcs_emulator.bucket, prefix)
    assert out["read"] == {"a": "value-a", "empty": ""}
    assert out["missing"] == "missing"
    assert out["list"] == ["a", "empty", "nested/b"]
    assert out["array"] == [[float(4 * r + c) for c in range(4)] for r in range(6)]

    files = files_under(gcs_emulator, prefix)
    assert {k: v for k, v in files.items() if k.startswith("kv/")} == {
        "kv/a": 7, "kv/empty": 0, "kv/nested/b": 700}
    assert gcs_emulator.read_object(prefix + "kv/nested/b") == b"value-b" * 100
    assert {k for k in files if k.startswith("arr/")} == {"arr/.zarray", "arr/0.0", "arr/1.0"}
    assert json.loads(gcs_emulator.read_object(prefix + "arr/.zarray"))["shape"] == [6, 4]


# ---------------------------------------------------------------------------------- orbax (OCDBT)

ORBAX = """
    import json
    import jax, jax.numpy as jnp, numpy as np
    import orbax.checkpoint as ocp
    directory = sys.argv[1]
    def tree1(step):
        return {"w": jnp.arange(12.0).reshape(3, 4) * step, "b": jnp.ones(4) * step, "count": step}
    tree2 = {"mu": np.arange(5, dtype=np.int32), "nu": {"x": jnp.zeros((2, 2))}}
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
    for step in (1, 2):
        manager.save(step, args=ocp.args.Composite(model=ocp.args.StandardSave(tree1(step)),
                                                   opt=ocp.args.StandardSave(tree2)))
    manager.wait_until_finished()
    out = {"steps": [int(s) for s in manager.all_steps()]}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree1(1))
    restored = manager.restore(1, args=ocp.args.Composite(model=ocp.args.StandardRestore(abstract)))
    out["restored"] = {k: np.asarray(v).tolist() for k, v in restored.model.items()}
    manager.save(3, args=ocp.args.Composite(model=ocp.args.StandardSave(tree1(3)),
                                            opt=ocp.args.StandardSave(tree2)))
    manager.wait_until_finished()
    out["steps_after_third"] = [int(s) for s in manager.all_steps()]
    manager.close()
    reopened = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
    out["steps_reopened"] = [int(s) for s in reopened.all_steps()]
    reopened.close()
    print("RESULT " + json.dumps(out))
"""


def test_orbax_checkpoint_manager(gcs_emulator):
    if importlib.util.find_spec("google.cloud.storage") is None:
        pytest.skip("orbax-checkpoint 0.12.8 imports google.cloud.storage for every gs:// directory "
                    "(gcs_utils.is_hierarchical_namespace_enabled, called from CheckpointManager's step "
                    "listing and from rmtree), but google-cloud-storage is not installed; with it "
                    "installed, STORAGE_EMULATOR_HOST sends it to the emulator")
    prefix = "orbax/run/checkpoints/"
    out = run_client(gcs_emulator, ORBAX, f"gs://{gcs_emulator.bucket}/{prefix}".rstrip("/"), timeout=120)
    assert out["steps"] == [1, 2]
    assert out["restored"] == {"w": [[float(4 * r + c) for c in range(4)] for r in range(3)],
                               "b": [1.0] * 4, "count": 1}
    assert out["steps_after_third"] == [2, 3] and out["steps_reopened"] == [2, 3]

    files = files_under(gcs_emulator, prefix)
    assert not [name for name in files if name.startswith("1/")]  # max_to_keep=2 deleted step 1
    assert not [name for name in files if "tmp" in name.lower()]  # nothing left half-committed
    for step in ("2", "3"):
        # On gs:// orbax commits with commit_success.txt files (CommitFileTemporaryPath), not renames.
        for name in ("commit_success.txt", "_CHECKPOINT_METADATA", "model/commit_success.txt",
                     "model/manifest.ocdbt", "model/_METADATA", "opt/commit_success.txt", "opt/manifest.ocdbt"):
            assert f"{step}/{name}" in files, (step, name, sorted(files))
        assert any(name.startswith(f"{step}/model/ocdbt.process_0/d/") for name in files)
    metadata = json.loads(gcs_emulator.read_object(prefix + "3/model/_METADATA"))
    assert set(metadata["tree_metadata"]) == {"('b',)", "('count',)", "('w',)"}


# ----------------------------------------------------------------------------------- clu writers

CLU = """
    import json
    import numpy as np
    import tensorflow as tf
    from clu import metric_writers
    workdir = sys.argv[1]
    writer = metric_writers.create_default_writer(workdir)
    writer.write_scalars(7, {"train/loss": 0.25, "eval/accuracy": 0.75})
    writer.write_images(7, {"plots/grid": np.random.RandomState(0).rand(2, 8, 8, 3).astype(np.float32)})
    writer.flush()
    writer.close()
    events = tf.io.gfile.glob(workdir + "/events.out.tfevents.*")
    values = {}
    for record in tf.data.TFRecordDataset(events):
        event = tf.compat.v1.Event.FromString(record.numpy())
        for value in event.summary.value:
            tensor = tf.make_ndarray(value.tensor)
            values[value.tag] = [event.step, float(tensor) if tensor.ndim == 0 else list(tensor.shape)]
    print("RESULT " + json.dumps({"events": [e.rsplit("/", 1)[1] for e in events], "values": values}))
"""


def test_clu_default_writer(gcs_emulator):
    prefix = "clu/run/"
    out = run_client(gcs_emulator, CLU, f"gs://{gcs_emulator.bucket}/{prefix}".rstrip("/"))
    assert out["values"]["train/loss"] == [7, 0.25] and out["values"]["eval/accuracy"] == [7, 0.75]
    assert out["values"]["plots/grid"] == [7, [4]]  # width, height and two encoded PNGs
    files = files_under(gcs_emulator, prefix)
    assert len(out["events"]) == 1 and list(files) == out["events"] and files[out["events"][0]] > 200


# ----------------------------------------------------------------- the emulator's own guarantees


def test_proxy_serves_only_google_hosts(gcs_emulator):
    """TF's traffic goes through the proxy; it must answer Google hosts and refuse every other one."""
    context = ssl.create_default_context(cafile=gcs_emulator.ca_file)
    ok = http.client.HTTPSConnection("127.0.0.1", gcs_emulator.proxy_port, context=context, timeout=10)
    ok.set_tunnel("storage.googleapis.com", 443)
    ok.request("GET", f"/storage/v1/b/{gcs_emulator.bucket}")
    assert json.loads(ok.getresponse().read())["name"] == gcs_emulator.bucket
    ok.close()
    refused = http.client.HTTPSConnection("127.0.0.1", gcs_emulator.proxy_port, context=context, timeout=10)
    refused.set_tunnel("example.com", 443)
    with pytest.raises(OSError, match="403"):
        refused.request("GET", "/")
    refused.close()
    assert gcs_emulator.running
