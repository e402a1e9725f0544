"""A model named by its hub id, as the mission's experiments name meta-llama/Llama-3.1-8B-Instruct: `train` downloads
what from_pretrained reads, once, saying so on the terminal, and the run's base is the same as a local copy's."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import DATA, can_mount_small_disks, run_cli, write_experiment
from tests.fake_hub import COMMIT, fake_hub, online_env
from tunelab.export import export_run
from tunelab.models import fingerprint

pytestmark = pytest.mark.slow
REPO_ID = "org/tiny-chat"


def test_a_hub_model_downloads_once_on_the_terminal_and_is_the_same_base_as_its_files(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Meta's repositories also hold original/ (the weights again, in Meta's format) and some hold .bin weights.
    extra = {"original/consolidated.00.pth": b"\0" * 4096, "pytorch_model.bin": b"\0" * 4096}
    exp = write_experiment(
        tmp_path,
        f"name: hub\nmodel: {{id: {REPO_ID}}}\ndata: {{train: {DATA / 'sft_train.jsonl'}}}\n"
        f"scope: {{lora: {{r: 4, targets: qv}}}}\ntrain: {{max_steps: 2, batch_size: 2}}\n"
        f"output: {{dir: {tmp_path / 'runs'}}}\n",
    )
    with fake_hub(REPO_ID, tiny_model_dir, extra) as hub:
        env = online_env(hub, tmp_path / "hf")
        first = run_cli("train", str(exp), env=env)
        assert first.returncode == 0, first.stderr[-3000:]
        said = [line for line in first.stdout.splitlines() if line.startswith("-> downloading")]
        shards = sorted(p.name for p in tiny_model_dir.glob("*.safetensors"))  # two, as Llama's weights are sharded
        weights = sum((tiny_model_dir / shard).stat().st_size for shard in shards)
        assert len(shards) == 2 and len(said) == 1 and said[0].startswith(f"-> downloading {REPO_ID}: ")
        # the files from_pretrained had not fetched for the config and tokenizer: the weights above all
        assert said[0].endswith(f" files, {weights / 1e6:.1f} MB, into {tmp_path / 'hf' / 'hub'}")
        assert sorted(f for f in hub.fetched() if f.endswith(".safetensors")) == shards  # each once, in parallel
        assert not [f for f in hub.fetched() if f.startswith("original/") or f.endswith(".bin")]

        manifest = json.loads((tmp_path / "runs" / "hub" / "manifest.json").read_text())
        assert manifest["base_model"]["id"] == REPO_ID
        assert manifest["base_model"]["path"].endswith(f"snapshots/{COMMIT}")
        assert manifest["base_model"]["fingerprint"] == fingerprint(str(tiny_model_dir))
        # The adapter names its base by the hub id, not by this machine's cache folder: it loads anywhere.
        adapter = json.loads((tmp_path / "runs" / "hub" / "adapter" / "adapter_config.json").read_text())
        assert (adapter["base_model_name_or_path"], adapter["revision"]) == (REPO_ID, COMMIT)
        card = (export_run(tmp_path / "runs" / "hub", tmp_path / "export") / "README.md").read_text()
        meta = yaml.safe_load(card.split("---\n")[1])
        assert (meta["base_model"], meta["base_model_relation"]) == (REPO_ID, "adapter")
        assert str(tmp_path) not in card

        before = len(hub.requests)
        again = run_cli("train", str(exp), "--name", "again", env=env)
        assert again.returncode == 0, again.stderr[-3000:]
        assert not [line for line in again.stdout.splitlines() if line.startswith("-> downloading")]
        assert not [r for r in hub.requests[before:] if r.startswith("GET ") and "/resolve/" in r]

    # The hub gone: offline, the run trains from the cached snapshot, as the same base ...
    cached = run_cli("train", str(exp), "--name", "offline", env=env | {"HF_HUB_OFFLINE": "1"})
    assert cached.returncode == 0, cached.stderr[-3000:]
    base = json.loads((tmp_path / "runs" / "offline" / "manifest.json").read_text())["base_model"]
    assert (base["path"], base["fingerprint"]) == (manifest["base_model"]["path"], fingerprint(str(tiny_model_dir)))
    # ... and unreachable without being told so (no network): asked once, then offline from the cached snapshot,
    # without the libraries retrying every file for half a minute each.
    unreachable = run_cli("train", str(exp), "--name", "unreachable", env=env)
    assert unreachable.returncode == 0, unreachable.stderr[-3000:]
    assert unreachable.stdout.startswith(
        f"-> the model hub cannot be reached ([Errno 111] Connection refused): {REPO_ID} from the local cache"
    )
    assert (
        "Retrying"
        not in unreachable.stdout + unreachable.stderr + (tmp_path / "runs/unreachable/train.log").read_text()
    )
    base = json.loads((tmp_path / "runs" / "unreachable" / "manifest.json").read_text())["base_model"]
    assert base["path"] == manifest["base_model"]["path"]


@pytest.mark.skipif(not can_mount_small_disks(), reason="needs `unshare -Urm` and tmpfs mounts (user namespaces)")
def test_a_download_the_cache_disk_cannot_hold_is_refused_before_it_starts(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The Hugging Face cache on a 1 MiB disk of its own: the config and tokenizer fit, the 3 MB of weights do not.
    One line before any weight is fetched, instead of a download that fills the disk and fails half-way."""
    import subprocess
    import sys

    exp = write_experiment(
        tmp_path,
        f"name: hub\nmodel: {{id: {REPO_ID}}}\ndata: {{train: {DATA / 'sft_train.jsonl'}}}\n"
        f"scope: {{lora: {{r: 4, targets: qv}}}}\ntrain: {{max_steps: 2, batch_size: 2}}\n"
        f"output: {{dir: {tmp_path / 'runs'}}}\n",
    )
    hf = tmp_path / "hf"
    hf.mkdir()
    with fake_hub(REPO_ID, tiny_model_dir) as hub:
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        env |= {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(hf), "HF_HUB_DISABLE_TELEMETRY": "1"}
        script = f"mount -t tmpfs -o size=1m tmpfs {hf} && {sys.executable} -m tunelab train {exp}"
        done = subprocess.run(
            ["unshare", "-Urm", "sh", "-c", script], capture_output=True, text=True, env=env, timeout=600
        )
        fetched = hub.fetched()
    weights = sum(p.stat().st_size for p in tiny_model_dir.glob("*.safetensors"))
    assert done.returncode == 2, done.stderr[-3000:]
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: {exp}: model.id: '{REPO_ID}' needs {weights / 1e6:.1f} MB more in {hf / 'hub'}")
    assert line.endswith("free; free space there, or set HF_HOME to a folder on a larger disk")
    assert (
        not [f for f in fetched if f.endswith(".safetensors")] and "tokenizer.json" in fetched
    )  # refused before the weights


def test_a_gated_model_says_how_to_get_access(tiny_model_dir: Path, tmp_path: Path) -> None:
    exp = write_experiment(
        tmp_path, f"name: gated\nmodel: {{id: {REPO_ID}}}\ndata: {{train: {DATA / 'sft_train.jsonl'}}}\n"
    )
    with fake_hub(REPO_ID, tiny_model_dir, gated=True) as hub:
        env = {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": None}
        done = run_cli("plan", str(exp), env=env | {"TRANSFORMERS_OFFLINE": None, "HF_HUB_DISABLE_TELEMETRY": "1"})
    assert done.returncode == 2 and done.stderr == (
        f"error: {exp}: model.id: '{REPO_ID}' is a gated repository: accept its license at "
        f"https://huggingface.co/{REPO_ID} while logged in, then log in here (hf auth login, or set HF_TOKEN)\n"
    )


def test_a_hub_dataset_reads_its_named_splits_and_from_the_cache_once_the_hub_is_gone(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """data.train as a hub dataset id (HuggingFaceH4/ultrachat_200k's layout: parquet shards under data/, train_sft and
    test_sft named in the README) at a pinned revision, through datasets.load_dataset; without a network it is asked
    once and read from the cache, and a dataset the cache lacks is one line that says how to get it."""
    import datasets

    def parquet(rows: list[dict]) -> bytes:
        path = tmp_path / "shard.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))
        return path.read_bytes()

    train_rows = [json.loads(line) for line in (DATA / "sft_train.jsonl").read_text().splitlines()[:24]]
    eval_rows = [json.loads(line) for line in (DATA / "sft_eval.jsonl").read_text().splitlines()[:6]]
    readme = "---\nconfigs:\n- config_name: default\n  data_files:\n"
    readme += "".join(f"  - split: {s}\n    path: data/{s}-*\n" for s in ("train_sft", "test_sft")) + "---\n"
    files = {
        "README.md": readme.encode(),
        "data/train_sft-00000-of-00001-5e3f.parquet": parquet(train_rows),
        "data/test_sft-00000-of-00001-9a1c.parquet": parquet(eval_rows),
    }
    exp = write_experiment(
        tmp_path,
        f"name: chats\nmodel: {{id: {tiny_model_dir}}}\n"
        "data: {train: org/chats, hub_split: train_sft, eval: org/chats, eval_split: test_sft, revision: v1.0}\n"
        f"scope: {{lora: {{r: 4, targets: qv}}}}\ntrain: {{max_steps: 1, batch_size: 2}}\n"
        f"output: {{dir: {tmp_path / 'runs'}}}\n",
    )
    (tmp_path / "empty").mkdir()
    with fake_hub("org/chats", tmp_path / "empty", files, repo_type="dataset") as hub:
        env = {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": None}
        env |= {"HF_DATASETS_OFFLINE": None, "TRANSFORMERS_OFFLINE": None, "HF_HUB_DISABLE_TELEMETRY": "1"}
        trained = run_cli("train", str(exp), env=env)
        assert trained.returncode == 0, trained.stderr[-3000:]
        assert sorted(f for f in hub.fetched() if f.endswith(".parquet")) == sorted(f for f in files if "/" in f)
        assert "HEAD /datasets/org/chats/resolve/v1.0/README.md" in hub.requests  # read at the revision asked for
    data = json.loads((tmp_path / "runs" / "chats" / "manifest.json").read_text())["data"]
    assert (data["train_examples"], data["eval_examples"]) == (len(train_rows), len(eval_rows))
    assert set(data["hashes"]) == {"org/chats", "org/chats:test_sft"}
    assert len(set(data["hashes"].values())) == 2

    gone = run_cli("plan", str(exp), env=env)
    assert gone.returncode == 0, gone.stderr[-3000:]
    assert gone.stdout.startswith(
        "-> the model hub cannot be reached ([Errno 111] Connection refused): org/chats from the local cache"
    )
    assert "Retrying" not in gone.stdout + gone.stderr
    assert f"│ {len(train_rows):>8} │" in gone.stdout and f"│ {len(eval_rows):>8} │" in gone.stdout

    # Another revision in the cache (as `hf download --revision v2.0` leaves it): without the hub, each pinned
    # revision reads its own files; datasets' own offline fallback would read the copy it prepared last (v1.0's).
    repo = tmp_path / "hf" / "hub" / "datasets--org--chats"
    first = (repo / "refs" / "v1.0").read_text()
    second = "b" * 40
    shutil.copytree(repo / "snapshots" / first, repo / "snapshots" / second, symlinks=False)
    for shard in (repo / "snapshots" / second / "data").glob("train_sft-*"):
        shard.unlink()
        shard.write_bytes(parquet(train_rows[:10]))
    (repo / "refs" / "v2.0").write_text(second)
    pinned = run_cli("plan", str(exp), "--set", "data.revision=v2.0", env=env)
    assert pinned.returncode == 0, pinned.stderr[-3000:]
    assert "│       10 │" in pinned.stdout and f"│ {len(eval_rows):>8} │" in pinned.stdout
    again = run_cli("plan", str(exp), env=env)
    assert f"│ {len(train_rows):>8} │" in again.stdout
    missing = run_cli("plan", str(exp), "--set", "data.revision=v3.0", env=env)
    assert missing.returncode == 2 and missing.stderr == (
        f"error: {exp}: data.train: 'org/chats' at revision 'v3.0' is not in the local cache and the hub cannot be "
        "reached; download it where there is a network (hf download org/chats --repo-type dataset --revision v3.0 "
        "--local-dir FOLDER) and point data.train at that folder\n"
    )

    uncached = run_cli("plan", str(exp), env=env | {"HF_HOME": str(tmp_path / "elsewhere")})
    assert uncached.returncode == 2 and uncached.stderr == (
        f"error: {exp}: data.train: 'org/chats' at revision 'v1.0' is not in the local cache and the hub cannot be "
        "reached; download it where there is a network (hf download org/chats --repo-type dataset --revision v1.0 "
        "--local-dir FOLDER) and point data.train at that folder\n"
    )


def test_a_gated_dataset_says_how_to_get_access(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    exp = write_experiment(
        tmp_path, "name: gated\nmodel: {id: builtin:tiny-chat}\ndata: {train: org/chats, eval_fraction: 0.1}\n"
    )
    with fake_hub("org/chats", tmp_path / "empty", {"README.md": b"x"}, gated=True, repo_type="dataset") as hub:
        env = {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": None}
        env |= {"HF_DATASETS_OFFLINE": None, "TRANSFORMERS_OFFLINE": None, "HF_HUB_DISABLE_TELEMETRY": "1"}
        done = run_cli("plan", str(exp), env=env)
    assert done.returncode == 2 and done.stderr == (
        f"error: {exp}: data.train: 'org/chats' is a gated repository: accept its license at "
        "https://huggingface.co/datasets/org/chats while logged in, then log in here (hf auth login, or set HF_TOKEN)\n"
    )
