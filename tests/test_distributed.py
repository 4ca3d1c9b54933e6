"""`distributed.embed` on a real local Ray: features equal `encode_images`', unreadable files skipped and listed,
workers killed with SIGKILL mid-run, an interrupted run resumed.

One Ray serves the whole session (starting one costs ~8 s and ~1.6 GB), with 2 CPUs: one decoding task and one
model actor at a time, as on a small machine. The model is a tiny random ViT (32 px input), so the time goes to
Ray, not to the model.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from PIL import Image, ImageDraw
from reference import reference_model

import openclip_lite as clip
from openclip_lite import distributed
from openclip_lite.cli import main
from openclip_lite.distributed import MANIFEST_NAME, EmbedError, embed, list_source
from openclip_lite.search import SkippedImageWarning

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_COUNT = 300
SHARD_SIZE = 50  # 300 images + 2 broken files -> 7 shards, the last one short
BATCH_SIZE = 32  # batches straddle shards (50): a shard is gathered from several batches
# the process titles Ray gives our model actors, and a worker while it runs one of our decoding tasks
ACTOR_TITLE = f"ray::MapWorker(MapBatches({distributed._ImageEncoder.__name__}))"
DECODE_TITLE = f"ray::MapBatches({distributed._decode_chunks.__name__})"


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray for the session. Its workers import openclip_lite from this checkout (it need not be installed)."""
    if ray.is_initialized():  # another test module's cluster: use it as it is
        yield
        return
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=256 * 2**20,
        runtime_env={"env_vars": {"PYTHONPATH": REPO}},
    )
    yield
    ray.shutdown()


def draw_shape(seed: int) -> Image.Image:
    """A coloured circle, square or triangle on a plain background, of varied size and aspect."""
    rng = np.random.default_rng(seed)
    width, height = (int(v) for v in rng.integers(24, 90, 2))
    background = tuple(int(v) for v in rng.integers(0, 256, 3))
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
    x1, y1 = x0 + int(rng.integers(6, width // 2 + 6)), y0 + int(rng.integers(6, height // 2 + 6))
    kind = seed % 3
    if kind == 0:
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif kind == 1:
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    else:
        draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=fill)
    return image


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """300 images in nested folders (PNG and JPEG; RGB, L, RGBA and P modes) plus two files that are not images."""
    folder = tmp_path_factory.mktemp("images")
    modes = ("RGB", "RGB", "L", "RGBA", "P")
    for i in range(IMAGE_COUNT):
        sub = folder / f"group{i % 4}"
        sub.mkdir(exist_ok=True)
        image = draw_shape(i).convert(modes[i % len(modes)])
        if i % 2 and image.mode in ("RGB", "L"):
            image.save(sub / f"{i:04d}.jpg", quality=90)
        else:
            image.save(sub / f"{i:04d}.png")
    whole = folder / "whole.jpg.part"
    draw_shape(999).save(whole, format="JPEG")
    data = whole.read_bytes()
    whole.unlink()
    (folder / "group1" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "group2" / "notes.png").write_text("this is not an image\n")
    return folder


@pytest.fixture(scope="module")
def broken(image_dir):
    return {str(image_dir / "group1" / "truncated.jpg"), str(image_dir / "group2" / "notes.png")}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny-vit.pt"
    torch.save(reference_model("tiny-vit").state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def expected(checkpoint, image_dir):
    """{path: feature} from `encode_images` (the single-machine path) on the readable images: the ground truth."""
    model, preprocess = clip.load(checkpoint, device="cpu")
    paths = list_source(str(image_dir))
    with pytest.warns(SkippedImageWarning):
        features, kept, skipped = clip.encode_images(model, preprocess, paths, batch_size=64, num_workers=0, on_error="skip")
    assert len(skipped) == 2
    return {paths[i]: features[row] for row, i in enumerate(kept)}


@pytest.fixture(scope="module")
def clean_run(ray_cluster, checkpoint, image_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("clean") / "shards"
    result = embed(str(image_dir), checkpoint, output, batch_size=BATCH_SIZE, shard_size=SHARD_SIZE, progress=False)
    return result, output


def read_shards(folder) -> tuple[list[str], torch.Tensor]:
    """The rows of every shard, in shard order: (paths, features (n, dim))."""
    paths, rows = [], []
    for name in sorted(f for f in os.listdir(folder) if f.endswith(".parquet")):
        table = pq.read_table(os.path.join(folder, name))
        paths.extend(table.column("path").to_pylist())
        rows.extend(table.column("embedding").to_pylist())
    return paths, torch.tensor(rows, dtype=torch.float32)


def assert_matches(folder, expected) -> None:
    """Every readable image once, with `encode_images`' features (fp32 tolerance)."""
    paths, features = read_shards(folder)
    assert len(paths) == len(set(paths)), "an image appears twice"
    assert sorted(paths) == sorted(expected)
    torch.testing.assert_close(features, torch.stack([expected[p] for p in paths]), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- a clean run


def test_features_equal_encode_images(clean_run, expected):
    result, output = clean_run
    assert_matches(output, expected)
    paths, _ = read_shards(output)
    assert paths == sorted(paths), "rows are in input order (the sorted listing), shard after shard"
    assert result.count == len(expected) == IMAGE_COUNT
    assert result.dim == 32 and result.written == result.shards and result.reused == []


def test_shards_and_manifest(clean_run, checkpoint, image_dir):
    result, output = clean_run
    names = sorted(os.listdir(output))
    assert names == [MANIFEST_NAME] + [f"part-{k:05d}.parquet" for k in range(7)], "no temporary files are left"
    table = pq.read_table(output / "part-00000.parquet")
    assert str(table.schema.field("path").type) == "string"
    assert str(table.schema.field("embedding").type) == "list<element: float>"
    norms = torch.tensor(table.column("embedding").to_pylist()).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    manifest = json.loads((output / MANIFEST_NAME).read_text())
    assert manifest["model"] == os.path.abspath(checkpoint)
    assert (manifest["dim"], manifest["count"], manifest["inputs"], manifest["shard_size"]) == (32, IMAGE_COUNT, IMAGE_COUNT + 2, SHARD_SIZE)
    assert manifest["source"] == str(image_dir)
    assert [s["file"] for s in manifest["shards"]] == result.shards
    assert [(s["start"], s["stop"]) for s in manifest["shards"]] == [(k * 50, min(k * 50 + 50, 302)) for k in range(7)]
    assert sum(s["count"] for s in manifest["shards"]) == IMAGE_COUNT


def test_unreadable_images_are_skipped_and_listed(clean_run, broken):
    result, output = clean_run
    manifest = json.loads((output / MANIFEST_NAME).read_text())
    listed = {entry["path"]: entry["reason"] for entry in manifest["skipped"]}
    assert set(listed) == broken == {path for path, _ in result.skipped}
    for path, reason in listed.items():
        assert path in reason and "cannot read" in reason, reason
    paths, _ = read_shards(output)
    assert not broken & set(paths)


def test_complete_output_is_left_as_is(clean_run, checkpoint, image_dir):
    result, output = clean_run
    before = {name: os.stat(output / name) for name in result.shards}
    again = embed(str(image_dir), checkpoint, output, batch_size=BATCH_SIZE, shard_size=SHARD_SIZE, progress=False)
    assert again.written == [] and again.reused == result.shards
    assert (again.count, again.skipped) == (result.count, result.skipped)
    for name, stat in before.items():
        assert os.stat(output / name).st_mtime_ns == stat.st_mtime_ns


def test_finished_output_of_another_source_is_kept(clean_run, checkpoint, image_dir, tmp_path):
    # a mistyped --out naming an earlier job's folder: redoing its shards for the new inputs would lose that job
    output = tmp_path / "earlier"
    shutil.copytree(clean_run[1], output)
    before = {name: (output / name).read_bytes() for name in os.listdir(output)}
    with pytest.raises(EmbedError, match=f"holds the finished embed of {image_dir}"):
        embed(str(image_dir / "group0"), checkpoint, output, progress=False)
    assert {name: (output / name).read_bytes() for name in os.listdir(output)} == before
    # the same folder spelt another way (from inside it) is the same source: nothing to redo
    cwd = os.getcwd()
    os.chdir(image_dir)
    try:
        again = embed(".", checkpoint, output, batch_size=BATCH_SIZE, shard_size=SHARD_SIZE, progress=False)
    finally:
        os.chdir(cwd)
    assert again.written == [] and again.reused == clean_run[0].shards


def test_readers_refuse_a_folder_with_a_shard_missing(clean_run, tmp_path):
    # a job still running writes shards as they finish: numbering rows past a missing one would be wrong
    from openclip_lite.milvus import load_shards_into_milvus
    from openclip_lite.shards import ShardError, open_shards

    output = tmp_path / "running"
    shutil.copytree(clean_run[1], output)
    (output / MANIFEST_NAME).unlink()
    assert len(open_shards(output)) == clean_run[0].count  # every shard there, no manifest yet: readable
    (output / clean_run[0].shards[2]).unlink()
    stop = SHARD_SIZE * 2
    with pytest.raises(ShardError, match=f"starts at input {SHARD_SIZE * 3} but the shards before it end at input {stop}"):
        open_shards(output)
    with pytest.raises(ShardError, match="has not finished"):
        load_shards_into_milvus(output, tmp_path / "m.db", "photos")

    # two shards compacted into one file by another tool keep the first one's footer, which no longer describes it
    compacted = tmp_path / "compacted"
    shutil.copytree(clean_run[1], compacted)
    first, second = (compacted / name for name in clean_run[0].shards[:2])
    pq.write_table(pa.concat_tables([pq.read_table(first), pq.read_table(second)]), first)
    second.unlink()
    (compacted / MANIFEST_NAME).unlink()
    assert len(open_shards(compacted)) == clean_run[0].count


# ---------------------------------------------------------------------------------------------------- failures


def process_title(pid: int) -> str:
    """The title Ray gives a worker ("ray::MapBatches(_decode_batch)"); "" once the process is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def process_state(pid: int) -> str:
    """R, S, Z (a zombie: killed, not yet reaped), ...; "" once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])  # after the "(name)", which may hold spaces
    except (OSError, ValueError, IndexError):
        return 0


def our_processes(title: str) -> list[int]:
    """PIDs of this test session's descendants (its Ray's workers) whose process title starts with `title`."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and process_title(int(entry)).startswith(title):
            pid = int(entry)
            while pid > 1 and pid != me:
                pid = parent(pid)
            if pid == me:
                found.append(int(entry))
    return found


def test_workers_killed_mid_run(ray_cluster, checkpoint, image_dir, expected, tmp_path):
    """SIGKILL a decoding task's worker and then the model actor while they work: the job completes anyway,
    with every image exactly once (Ray retries the task, restarts the actor and retries its batches)."""
    killed: dict[str, int] = {}
    written_after_kill: list[str] = []
    done = threading.Event()

    def kill_a_decoder() -> None:  # the decoding tasks start at once, while the actor is still loading the model
        while not done.is_set():
            pids = our_processes(DECODE_TITLE)
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed["decoder"] = pids[0]
                return
            time.sleep(0.002)

    def on_shard(name: str) -> None:
        if "actor" in killed:
            written_after_kill.append(name)
            return
        pids = [pid for pid in our_processes(ACTOR_TITLE) if not process_title(pid).endswith(".__init__")]
        assert len(pids) == 1, f"expected one working model actor, found {pids}"
        os.kill(pids[0], signal.SIGKILL)
        killed["actor"] = pids[0]

    killer = threading.Thread(target=kill_a_decoder, daemon=True)
    killer.start()
    try:
        # small batches and shards: the first shard is written while most batches are still to come
        result = embed(str(image_dir), checkpoint, tmp_path / "out", batch_size=8, shard_size=25, progress=False, on_shard=on_shard)
    finally:
        done.set()
        killer.join()
    assert set(killed) == {"decoder", "actor"}
    assert written_after_kill, "the actor was killed after the last shard: not mid-run"
    for pid in killed.values():
        assert process_state(pid) in ("", "Z"), "the killed process still runs"
    assert result.count == IMAGE_COUNT and len(result.skipped) == 2
    assert_matches(tmp_path / "out", expected)


def test_interrupted_run_resumes(ray_cluster, checkpoint, image_dir, clean_run, tmp_path):
    """Ctrl-C after 3 shards; the re-run writes only the 4 missing shards, and the result equals a clean run's."""
    output = tmp_path / "out"

    def interrupt_after_three(name: str) -> None:
        if len(os.listdir(output)) >= 3:  # no manifest, no temporary file by now: the shards
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embed(str(image_dir), checkpoint, output, batch_size=BATCH_SIZE, shard_size=SHARD_SIZE, progress=False, on_shard=interrupt_after_three)
    finished = sorted(os.listdir(output))
    assert len(finished) == 3 and MANIFEST_NAME not in finished
    before = {name: os.stat(output / name) for name in finished}
    (output / "part-00006.parquet.tmp-deadbeef").write_bytes(b"PAR1 half a shard")  # a write cut short by a crash

    result = embed(str(image_dir), checkpoint, output, batch_size=BATCH_SIZE, shard_size=SHARD_SIZE, progress=False)
    assert sorted(result.reused) == finished
    assert sorted(result.written) == sorted(set(result.shards) - set(finished)) and len(result.written) == 4
    for name, stat in before.items():
        now = os.stat(output / name)
        assert (now.st_ino, now.st_mtime_ns, now.st_size) == (stat.st_ino, stat.st_mtime_ns, stat.st_size), f"{name} was rewritten"
    assert sorted(os.listdir(output)) == sorted(os.listdir(clean_run[1]))

    clean_paths, clean_features = read_shards(clean_run[1])
    paths, features = read_shards(output)
    assert paths == clean_paths
    torch.testing.assert_close(features, clean_features, rtol=1e-5, atol=1e-5)
    clean_manifest = json.loads((clean_run[1] / MANIFEST_NAME).read_text())
    manifest = json.loads((output / MANIFEST_NAME).read_text())
    for key in ("model", "dim", "count", "inputs", "source", "shards", "skipped"):
        assert manifest[key] == clean_manifest[key], key


def test_shards_of_other_inputs_are_redone(ray_cluster, checkpoint, image_dir, clean_run, tmp_path):
    """A finished shard whose slice now holds other inputs is written again; the shards of unchanged slices are kept."""
    output = tmp_path / "out"
    shutil.copytree(clean_run[1], output)
    paths = list_source(str(image_dir))
    paths[260], paths[261] = paths[261], paths[260]  # slice 5 (250..299) holds the same files in another order
    del paths[-1]  # slice 6 loses its last file
    result = embed(paths, checkpoint, output, batch_size=BATCH_SIZE, shard_size=SHARD_SIZE, progress=False)
    assert result.reused == clean_run[0].shards[:5] and result.written == clean_run[0].shards[5:]
    written, _ = read_shards(output)
    assert written == [p for p in paths if p in set(written)], "rows follow the new order"
    assert json.loads((output / MANIFEST_NAME).read_text())["inputs"] == IMAGE_COUNT + 1


# ---------------------------------------------------------------------------------------------------- sources


def test_dataset_sources(ray_cluster, checkpoint, image_dir, expected, tmp_path):
    """A ray.data.Dataset with a path column, and one with decoded images (read_images), as sources."""
    rgb = sorted(p for p in expected if p.endswith(".jpg"))[:24]  # read_images gives RGB arrays: RGB files only
    with_paths = ray.data.from_items([{"path": p} for p in rgb])
    result = embed(with_paths, checkpoint, tmp_path / "paths", batch_size=BATCH_SIZE, shard_size=10, progress=False)
    assert result.count == 24
    assert_matches(tmp_path / "paths", {p: expected[p] for p in rgb})

    decoded = ray.data.read_images(rgb, include_paths=True, mode="RGB")
    result = embed(decoded, checkpoint, tmp_path / "images", batch_size=BATCH_SIZE, shard_size=10, progress=False)
    assert result.count == 24 and len(result.shards) == 3
    assert_matches(tmp_path / "images", {p: expected[p] for p in rgb})


def test_list_source(image_dir):
    everything = list_source(str(image_dir))
    assert len(everything) == IMAGE_COUNT + 2 and everything == sorted(everything)
    assert list_source(str(image_dir / "group0" / "*.png")) == sorted(str(p) for p in (image_dir / "group0").glob("*.png"))
    assert list_source(str(image_dir / "**" / "00[01]?.jpg")) == sorted(str(p) for p in image_dir.glob("*/00[01]?.jpg"))
    uris = list_source(f"file://{image_dir}/group3")
    assert uris == [f"file://{p}" for p in sorted(everything) if "/group3/" in p]
    two = [everything[5], everything[1]]
    assert list_source(two) == two, "a list keeps its order"
    with pytest.raises(FileNotFoundError, match="no files match"):
        list_source(str(image_dir / "*.nothing"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        list_source(f"file://{image_dir}/missing")


def test_cli_with_uri_source(ray_cluster, checkpoint, image_dir, expected, tmp_path, capsys):
    """`openclip-lite embed URI --engine ray`: file:// URIs are read through pyarrow's filesystem, as s3:// or
    gs:// would be, and the output is the same as for local paths."""
    out = tmp_path / "out"
    argv = ["embed", f"file://{image_dir}/group3", "--engine", "ray", "--out", str(out), "--model", checkpoint]
    assert main([*argv, "--batch-size", "16", "--actors", "1", "--shard-size", "40"]) == 0
    assert "embedded 75 images" in capsys.readouterr().out
    paths, features = read_shards(out)
    assert paths == sorted(f"file://{p}" for p in expected if "/group3/" in p) and len(os.listdir(out)) == 3
    torch.testing.assert_close(features, torch.stack([expected[p.removeprefix("file://")] for p in paths]), rtol=1e-5, atol=1e-5)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_on_a_cluster_started_with_ray_start(checkpoint, image_dir, expected, tmp_path):
    """A cluster as users start one (`ray start --head`, token authentication on, as Ray 2.61 makes the default),
    reached by `--address` from a separate driver process: the cluster path, not the local Ray of the other tests."""
    port, temp = free_port(), tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, "PYTHONPATH": REPO, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(16).hex()}
    env.pop("RAY_ADDRESS", None)
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    head = subprocess.Popen(
        [ray_cli, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false", "--block",
         f"--temp-dir={temp}", "--disable-usage-stats", f"--object-store-memory={200 * 2**20}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        out = tmp_path / "out"
        command = [sys.executable, "-m", "openclip_lite.cli", "embed", str(image_dir / "group0"), "--engine", "ray",
                   "--address", f"127.0.0.1:{port}", "--out", str(out), "--model", checkpoint, "--batch-size", "16",
                   "--shard-size", "40"]
        for _ in range(30):  # the head takes a few seconds to listen; until then the driver cannot connect
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
            if result.returncode == 0 or head.poll() is not None or "embedded" in result.stdout:
                break
            time.sleep(2)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "embedded 75 images" in result.stdout
        paths, features = read_shards(out)
        assert paths == sorted(p for p in expected if "/group0/" in p)
        torch.testing.assert_close(features, torch.stack([expected[p] for p in paths]), rtol=1e-5, atol=1e-5)
        command[command.index("--out") + 1] = str(tmp_path / "wrong")
        wrong = subprocess.run(command, env={**env, "RAY_AUTH_TOKEN": "0" * 32}, capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
        assert wrong.returncode != 0 and "token" in wrong.stderr.lower(), wrong.stderr[-3000:]  # a wrong token: refused
        assert not (tmp_path / "wrong" / MANIFEST_NAME).exists()
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops its processes on SIGTERM, though not all
        try:
            head.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        for pid in [int(p) for p in os.listdir("/proc") if p.isdigit()]:  # workers have process groups of their own
            try:
                if os.getsid(pid) == head.pid:
                    os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        shutil.rmtree(temp, ignore_errors=True)


def test_cli_rejects_options_of_the_other_engine(image_dir, tmp_path, capsys):
    assert main(["embed", str(image_dir), "--engine", "ray", "--out", str(tmp_path / "o"), "--index", "hnsw"]) == 1
    assert "--index only apply to --engine local" in capsys.readouterr().err
    assert main(["embed", str(image_dir), "--out", str(tmp_path / "o.pt"), "--actors", "2"]) == 1
    assert "need --engine ray" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o") and not os.path.exists(tmp_path / "o.pt")


# ---------------------------------------------------------------------------------------------------- misuse


def test_errors_say_what_to_do(checkpoint, image_dir, tmp_path):
    with pytest.raises(ValueError, match="output="):
        embed(str(image_dir), checkpoint)
    with pytest.raises(ValueError, match="batch_size"):
        embed(str(image_dir), checkpoint, tmp_path, batch_size=0)
    with pytest.raises(clip.UnknownModelError):
        embed(str(image_dir), "ViT-B/33", tmp_path / "out")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "part-00000.parquet").write_bytes(b"not ours")
    with pytest.raises(EmbedError, match="not written by openclip-lite"):
        embed(str(image_dir / "group0"), checkpoint, foreign, progress=False)
    assert (foreign / "part-00000.parquet").read_bytes() == b"not ours"


def test_import_needs_no_ray():
    """`import openclip_lite(.distributed)` imports neither ray nor pyarrow; embed without ray names the extra."""
    code = (
        "import sys\n"
        "import openclip_lite, openclip_lite.distributed as d\n"
        "assert 'ray' not in sys.modules and 'pyarrow' not in sys.modules, sorted(sys.modules)\n"
        "sys.modules['ray'] = None\n"  # as if ray were not installed
        "try:\n"
        "    d.embed('.', 'x', 'out')\n"
        "except openclip_lite.MissingDependencyError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert 'pip install "openclip-lite[ray]"' in out.stdout
