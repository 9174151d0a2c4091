"""Hub sharing: push, pull and load vitrail checkpoints against a Hub-protocol server on 127.0.0.1.

The server (`tests/hub_server.py`) keeps repos in memory and speaks the protocol huggingface_hub 2.4 uses; the
client in this process is repointed at it per test (fresh HF_HOME, dummy token), and the Hub-code check runs
in a subprocess that cannot import vitrail and reaches the server through HF_ENDPOINT, as a user's machine
would.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from huggingface_hub import HfApi, constants
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageClassification

from vitrail import VitrailForImageClassification, VitrailImageProcessor
from vitrail.hub import (
    CheckpointError,
    HubError,
    check_checkpoint,
    checkpoint_files,
    not_pushed,
    pull_checkpoint,
    push_checkpoint,
)

from .conftest import load_script, run_without_vitrail, tiny_config
from .hub_server import USER, client_env

ID2LABEL = {0: "cat", 1: "dog", 2: "bird"}
CODE_FILES = ("configuration_vitrail.py", "modeling_vitrail.py", "image_processing_vitrail.py")
CARD = "---\nlibrary_name: transformers\npipeline_tag: image-classification\ntags: [vitrail]\n---\n\n# tiny\n"
# What a trained folder holds and a push uploads (`scripts/train.py` writes these).
SHARED = {
    "model.safetensors",
    "config.json",
    "preprocessor_config.json",
    *CODE_FILES,
    "README.md",
    "training_curves.png",
    "all_results.json",
}
PULLED = SHARED - {"training_curves.png", "all_results.json"}
PULL_RECORD = ".vitrail-pull.json"


def make_checkpoint(folder: Path, seed: int, max_shard_size: str | None = None) -> Path:
    """A trained-like folder: weights far from the initialisation, processor, card, a plot and results; with
    `max_shard_size`, the weights are sharded (an index and its shards)."""
    config = tiny_config(num_labels=3, id2label=ID2LABEL, label2id={v: k for k, v in ID2LABEL.items()})
    model = VitrailForImageClassification(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    VitrailImageProcessor(size={"height": 30, "width": 30}).save_pretrained(folder)
    (folder / "README.md").write_text(CARD)
    PIL.Image.new("RGB", (8, 6), (seed * 40, 90, 200)).save(folder / "training_curves.png")
    (folder / "all_results.json").write_text(json.dumps({"test_accuracy": 0.5 + seed / 10}))
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """Two versions of one model (different weights), an input batch and each version's logits on it."""
    root = tmp_path_factory.mktemp("checkpoints")
    inputs = torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(5))
    made = {"root": root, "inputs": inputs}
    for name, seed, shard in (("v1", 0, None), ("v2", 1, None), ("v2_sharded", 1, "30KB")):
        folder = make_checkpoint(root / name, seed, shard)
        with torch.no_grad():
            made[f"{name}_logits"] = VitrailForImageClassification.from_pretrained(folder)(inputs).logits
        made[name] = folder
    assert not torch.allclose(made["v1_logits"], made["v2_logits"])
    assert torch.equal(made["v2_logits"], made["v2_sharded_logits"])
    assert len(list(made["v2_sharded"].glob("model-*-of-*.safetensors"))) > 1
    return made


@pytest.fixture
def repo_id(request) -> str:
    return f"{USER}/{request.node.name.replace('[', '-').replace(']', '')}"


def copy_of(folder: Path, tmp_path: Path, name: str = "ckpt") -> Path:
    return Path(shutil.copytree(folder, tmp_path / name))


def same_weights(folder_a, folder_b) -> bool:
    a, b = load_file(Path(folder_a) / "model.safetensors"), load_file(Path(folder_b) / "model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def leftovers(parent: Path) -> list[str]:
    """What a test's folder holds besides the per-test HF_HOME (nothing if it does not exist)."""
    return sorted(path.name for path in parent.glob("*") if path.name != "hf_home")


# ---- push --------------------------------------------------------------------------------------------------


def test_push_uploads_the_checkpoint_files_only(hub, checkpoints, tmp_path, repo_id):
    """One commit with the checkpoint's files, byte for byte: the allowlist, not patterns. Other top-level JSON,
    code, Markdown and PNG files, subfolders and the pull record stay home and are listed as not pushed."""
    folder = copy_of(checkpoints["v1"], tmp_path)
    (folder / "checkpoint-3").mkdir()
    (folder / "checkpoint-3" / "optimizer.pt").write_bytes(b"resume state stays local")
    (folder / "notes.txt").write_text("not part of a checkpoint")
    (folder / "secrets.json").write_text('{"token": "hf_secret"}')
    (folder / "local_settings.py").write_text("PASSWORD = 'secret'\n")
    (folder / "TODO.md").write_text("private notes")
    (folder / "scratch.png").write_bytes((folder / "training_curves.png").read_bytes())
    (folder / "attention_map.png").write_bytes((folder / "training_curves.png").read_bytes())
    (folder / "patches.png").write_bytes((folder / "training_curves.png").read_bytes())
    (folder / "README.md").write_text(CARD + '\n![attention](./attention_map.png)\n<img src="patches.png">\n')
    (folder / "trainer_state.json").write_text("{}")
    (folder / PULL_RECORD).write_text("{}")
    shared = SHARED | {"attention_map.png", "patches.png", "trainer_state.json"}
    left_out = ["TODO.md", "checkpoint-3/", "local_settings.py", "notes.txt", "scratch.png", "secrets.json"]
    assert checkpoint_files(folder) == sorted(shared)
    assert not_pushed(folder) == sorted([PULL_RECORD, *left_out])

    commit = push_checkpoint(folder, repo_id)

    files = hub.files(repo_id)
    assert set(files) == shared | {".gitattributes"}
    for name in shared:
        assert files[name] == (folder / name).read_bytes(), name
    assert hub.commit_count(repo_id) == 2  # the repo's initial commit and ours
    assert commit.oid == hub.head(repo_id).sha
    assert commit.commit_url == f"{hub.url}/{repo_id}/commit/{commit.oid}"
    assert hub.head(repo_id).title == "Upload vitrail checkpoint ckpt"
    assert hub.repos[repo_id].private is False


def test_push_include_uploads_deliberate_extras(hub, checkpoints, tmp_path, repo_id):
    """include= adds top-level files by pattern; never a subfolder's, never the pull record."""
    folder = copy_of(checkpoints["v1"], tmp_path)
    (folder / "notes.txt").write_text("shared on purpose")
    (folder / "eval.py").write_text("print('how we evaluated')\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "notes.txt").write_text("stays")
    (folder / PULL_RECORD).write_text("{}")
    with pytest.raises(CheckpointError, match="names a path"):
        push_checkpoint(folder, repo_id, include=["sub/*.txt"])
    with pytest.raises(CheckpointError, match=r"'\*\.csv' matches no file"):
        push_checkpoint(folder, repo_id, include=["*.csv"])
    assert repo_id not in hub.repos

    push_checkpoint(folder, repo_id, include=["*.txt", "*.py", "*"])
    assert set(hub.files(repo_id)) == SHARED | {".gitattributes", "notes.txt", "eval.py"}
    assert not_pushed(folder, include=["*"]) == [PULL_RECORD, "sub/"]


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_push_refuses_a_symbolic_link(hub, checkpoints, tmp_path, repo_id, kind):
    """A link is refused by name and target before anything is sent, whether or not it would be pushed."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_text("root:x:0:0")
    folder = copy_of(checkpoints["v1"], tmp_path)
    link, target = ("notes.md", outside / "passwd") if kind == "file" else ("plots", outside)
    (folder / link).symlink_to(target)
    requests = len(hub.requests)
    with pytest.raises(CheckpointError, match=rf"symbolic links \({link} -> {target}\)"):
        push_checkpoint(folder, repo_id, include=["*"])
    assert len(hub.requests) == requests
    assert repo_id not in hub.repos


def test_push_deletes_weights_of_the_other_layout(hub, checkpoints, repo_id):
    """Sharded over single-file and back: each push removes the other layout (and shards the index does not
    name) in its own commit, and plain transformers loads the weights just pushed (it would take a stale
    model.safetensors over an index)."""
    sharded = checkpoints["v2_sharded"]
    shards = {path.name for path in sharded.glob("model-*-of-*.safetensors")}

    def logits():
        model = AutoModelForImageClassification.from_pretrained(repo_id, trust_remote_code=True)
        with torch.no_grad():
            return model(checkpoints["inputs"]).logits

    push_checkpoint(checkpoints["v1"], repo_id)
    hub.put(repo_id, {"model-00009-of-00009.safetensors": b"an older sharding"})
    commits = hub.commit_count(repo_id)
    push_checkpoint(sharded, repo_id)
    files = set(hub.files(repo_id))
    assert hub.commit_count(repo_id) == commits + 1
    assert "model.safetensors" not in files and {"model.safetensors.index.json", *shards} <= files
    assert torch.equal(logits(), checkpoints["v2_logits"])

    push_checkpoint(checkpoints["v1"], repo_id)
    files = set(hub.files(repo_id))
    assert hub.commit_count(repo_id) == commits + 2
    assert "model.safetensors" in files and not files & {"model.safetensors.index.json", *shards}
    assert torch.equal(logits(), checkpoints["v1_logits"])


def test_check_refuses_both_weight_layouts(checkpoints, tmp_path):
    folder = copy_of(checkpoints["v2_sharded"], tmp_path)
    shutil.copy(checkpoints["v1"] / "model.safetensors", folder)
    with pytest.raises(CheckpointError, match="both model.safetensors and model.safetensors.index.json"):
        check_checkpoint(folder)


def test_push_private_with_message_and_bare_name(hub, checkpoints):
    """A bare name lands in the token's namespace; private and the commit message reach the Hub."""
    commit = push_checkpoint(checkpoints["v1"], "bare-name", private=True, commit_message="first version")
    assert commit is not None
    assert hub.repos[f"{USER}/bare-name"].private is True
    assert hub.head(f"{USER}/bare-name").title == "first version"


def test_repush_unchanged_makes_no_commit(hub, checkpoints, tmp_path, repo_id):
    """Pushing the same folder again commits nothing; changing one file commits exactly that file."""
    folder = copy_of(checkpoints["v1"], tmp_path)
    first = push_checkpoint(folder, repo_id)
    commits, posts = hub.commit_count(repo_id), len([r for r in hub.requests if "/commit/" in r[1]])

    assert push_checkpoint(folder, repo_id) is None
    assert hub.commit_count(repo_id) == commits
    assert len([r for r in hub.requests if "/commit/" in r[1]]) == posts  # not even an attempt
    assert hub.head(repo_id).sha == first.oid

    (folder / "README.md").write_text(CARD + "\nUpdated card.\n")
    second = push_checkpoint(folder, repo_id)
    assert hub.commit_count(repo_id) == commits + 1
    before, after = hub.files(repo_id, first.oid), hub.files(repo_id, second.oid)
    assert {name for name in after if after[name] != before.get(name)} == {"README.md"}


def test_push_to_a_new_branch_leaves_main_alone(hub, checkpoints, repo_id):
    """revision= creates the branch from main and commits there; main keeps the first version."""
    v1 = push_checkpoint(checkpoints["v1"], repo_id)
    v2 = push_checkpoint(checkpoints["v2"], repo_id, revision="v2")
    assert hub.head(repo_id, "main").sha == v1.oid
    assert hub.head(repo_id, "v2").sha == v2.oid
    assert hub.head(repo_id, "v2").parent == v1.oid
    assert (
        hub.files(repo_id, "v2")["model.safetensors"]
        == (checkpoints["v2"] / "model.safetensors").read_bytes()
    )
    # Only the files that differ travel: the code files are identical in both versions.
    changed = {n for n, d in hub.files(repo_id, "v2").items() if d != hub.files(repo_id, "main").get(n)}
    assert changed == {"model.safetensors", "training_curves.png", "all_results.json"}
    assert push_checkpoint(checkpoints["v2"], repo_id, revision="v2") is None


def test_push_refuses_a_bad_folder_before_contacting_the_hub(hub, checkpoints, tmp_path, repo_id):
    folder = copy_of(checkpoints["v1"], tmp_path)
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    requests = len(hub.requests)
    with pytest.raises(CheckpointError, match="pickle"):
        push_checkpoint(folder, repo_id)
    assert len(hub.requests) == requests
    assert repo_id not in hub.repos


def test_push_to_a_commit_sha_is_refused(hub, checkpoints, repo_id):
    requests = len(hub.requests)
    with pytest.raises(
        HubError, match=rf"push to '{repo_id}' \(revision '{'a' * 40}'\).*a commit sha.*branch name"
    ):
        push_checkpoint(checkpoints["v1"], repo_id, revision="a" * 40)
    assert len(hub.requests) == requests


def test_push_server_error_makes_no_commit(hub, checkpoints, repo_id):
    push_checkpoint(checkpoints["v1"], repo_id)
    commits = hub.commit_count(repo_id)
    hub.fail_next(r"^POST /api/models/.*/commit/", status=500)
    with pytest.raises(HubError, match=rf"'{repo_id}' \(revision 'v2'\).*server failed \(HTTP 500\)"):
        push_checkpoint(checkpoints["v2"], repo_id, revision="v2")
    assert hub.commit_count(repo_id) == commits
    assert hub.head(repo_id, "v2").sha == hub.head(repo_id, "main").sha  # the branch exists, unchanged


def test_push_refuses_to_overwrite_a_push_that_landed_meanwhile(hub, checkpoints, repo_id):
    """The commit names the head the push started from: someone else's commit in between makes it fail (HTTP 412)
    rather than silently mix the two."""
    push_checkpoint(checkpoints["v1"], repo_id)
    hub.before_next(
        rf"^POST /api/models/{repo_id}/commit/main$", lambda: hub.put(repo_id, {"notes.md": b"theirs"})
    )
    with pytest.raises(
        HubError, match=rf"push to '{repo_id}' \(revision 'main'\).*branch moved while pushing"
    ):
        push_checkpoint(checkpoints["v2"], repo_id)
    assert hub.files(repo_id)["notes.md"] == b"theirs"
    assert hub.files(repo_id)["model.safetensors"] == (checkpoints["v1"] / "model.safetensors").read_bytes()


def test_push_answer_lost_then_repush_is_a_no_op(hub, checkpoints, repo_id):
    """The commit lands but the connection drops before the answer: the error says so, and pushing again is
    safe because an unchanged folder makes no second commit."""
    hub.drop_next(r"^POST /api/models/.*/commit/", after_bytes=0)
    with pytest.raises(HubError, match="connection failed or was cut"):
        push_checkpoint(checkpoints["v1"], repo_id)
    assert hub.commit_count(repo_id) == 2
    assert push_checkpoint(checkpoints["v1"], repo_id) is None
    assert hub.commit_count(repo_id) == 2


def test_push_card_refused_by_the_hub(hub, checkpoints, repo_id):
    """The Hub validates the card's metadata itself (more than YAML syntax); its refusal is named."""
    hub.fail_next(r"^POST /api/validate-yaml$", status=400)
    with pytest.raises(HubError, match=rf"push to '{repo_id}'.*refused the model card"):
        push_checkpoint(checkpoints["v1"], repo_id)
    assert hub.commit_count(repo_id) == 1  # created, but nothing committed


# ---- check -------------------------------------------------------------------------------------------------


def _write_nan_weights(folder: Path):
    weights = load_file(folder / "model.safetensors")
    weights = {name: torch.full_like(tensor, float("nan")) for name, tensor in weights.items()}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def _edit_json(name: str, **changes):
    def edit(folder: Path):
        data = json.loads((folder / name).read_text())
        data.update(changes)
        (folder / name).write_text(json.dumps(data))

    return edit


BROKEN = {
    "pickle weights": (
        lambda f: (f / "pytorch_model.bin").write_bytes(b"x"),
        "pickle files \\(pytorch_model.bin\\)",
    ),
    "optimizer state": (lambda f: (f / "optimizer.pt").write_bytes(b"x"), "pickle files \\(optimizer.pt\\)"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), "no model.safetensors"),
    "no config": (lambda f: (f / "config.json").unlink(), "no config.json"),
    "not vitrail": (_edit_json("config.json", model_type="vit"), "model_type 'vit', not 'vitrail'"),
    "no code file": (
        lambda f: (f / "modeling_vitrail.py").unlink(),
        r"code file modeling_vitrail.py is missing \(named by config.json's auto_map\['AutoBackbone'\], "
        r"config.json's auto_map\['AutoModel'\], config.json's auto_map\['AutoModelForImageClassification'\]\); "
        r"save the model with vitrail's classes",
    ),
    "no processor code": (
        lambda f: (f / "image_processing_vitrail.py").unlink(),
        r"image_processing_vitrail.py is missing \(named by config.json's auto_map\['AutoImageProcessor'\], "
        r"preprocessor_config.json's auto_map\['AutoImageProcessor'\]\); save the image processor",
    ),
    "no processor": (lambda f: (f / "preprocessor_config.json").unlink(), "no preprocessor_config.json"),
    "config not an object": (
        lambda f: (f / "config.json").write_text("[]"),
        r"config.json is not a JSON object \(it holds a list\)",
    ),
    "weights of another shape": (_edit_json("config.json", hidden_size=36), "does not load|do not match"),
    "forward fails": (
        _edit_json("preprocessor_config.json", size={"height": 20, "width": 20}),
        "forward pass on a processed dummy image fails",
    ),
    "nan weights": (_write_nan_weights, "not finite"),
    "card metadata": (
        lambda f: (f / "README.md").write_text("---\ntags: [a\n---\n# x\n"),
        "metadata .* parse",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_check_checkpoint_refuses(case, checkpoints, tmp_path):
    folder = copy_of(checkpoints["v1"], tmp_path)
    check_checkpoint(folder)  # the intact copy passes
    breakage, message = BROKEN[case]
    breakage(folder)
    with pytest.raises(CheckpointError, match=message):
        check_checkpoint(folder)


def test_check_checkpoint_names_the_cause_for_a_model_saved_alone(checkpoints, tmp_path):
    """A model saved without its processor (as from Hub-carried code) maps no processor code; the check says
    that the processor is what is missing, not that save_pretrained failed to copy a file."""
    folder = copy_of(checkpoints["v1"], tmp_path)
    for name in ("image_processing_vitrail.py", "preprocessor_config.json"):
        (folder / name).unlink()
    _edit_json("config.json", auto_map={"AutoConfig": "configuration_vitrail.VitrailConfig",
                                        "AutoModel": "modeling_vitrail.VitrailModel"})(folder)  # fmt: skip
    with pytest.raises(CheckpointError) as error:
        check_checkpoint(folder)
    assert "no preprocessor_config.json" in str(error.value)
    assert (
        "image_processing_vitrail.py is missing (part of every vitrail checkpoint); save the image processor"
        in str(error.value)
    )


def test_check_checkpoint_lists_every_structural_problem(checkpoints, tmp_path):
    folder = copy_of(checkpoints["v1"], tmp_path)
    for name in ("model.safetensors", "image_processing_vitrail.py", "preprocessor_config.json"):
        (folder / name).unlink()
    with pytest.raises(CheckpointError) as error:
        check_checkpoint(folder)
    for fragment in ("no model.safetensors", "no preprocessor_config.json", "image_processing_vitrail.py"):
        assert fragment in str(error.value)


# ---- pull --------------------------------------------------------------------------------------------------


def test_pull_revisions_match_their_weights(hub, checkpoints, tmp_path, repo_id):
    """Branches and commit shas each give back the weights that were pushed there."""
    v1 = push_checkpoint(checkpoints["v1"], repo_id)
    push_checkpoint(checkpoints["v2"], repo_id, revision="v2")
    main = pull_checkpoint(repo_id)
    assert {p.name for p in main.iterdir()} == PULLED
    assert same_weights(main, checkpoints["v1"])
    assert same_weights(pull_checkpoint(repo_id, revision="v2"), checkpoints["v2"])

    # A second commit on main: main moves on, the first commit's sha still gives the first weights.
    push_checkpoint(checkpoints["v2"], repo_id)
    assert same_weights(pull_checkpoint(repo_id, local_dir=tmp_path / "main"), checkpoints["v2"])
    assert same_weights(
        pull_checkpoint(repo_id, revision=v1.oid, local_dir=tmp_path / "old"), checkpoints["v1"]
    )
    assert {p.name for p in (tmp_path / "old").iterdir()} == PULLED | {PULL_RECORD}
    assert leftovers(tmp_path) == ["main", "old"]


def test_from_pretrained_on_the_repo_id_in_process(hub, checkpoints, repo_id):
    push_checkpoint(checkpoints["v1"], repo_id)
    push_checkpoint(checkpoints["v2"], repo_id, revision="v2")
    with torch.no_grad():
        for revision, name in ((None, "v1"), ("v2", "v2")):
            model = VitrailForImageClassification.from_pretrained(repo_id, revision=revision)
            assert torch.equal(model(checkpoints["inputs"]).logits, checkpoints[f"{name}_logits"]), revision


def test_pull_into_an_existing_folder_replaces_checkpoint_files_only(hub, checkpoints, tmp_path, repo_id):
    """The previous checkpoint's files go, even those the pull does not fetch (its plot and results describe the
    old weights); the user's own files stay."""
    push_checkpoint(checkpoints["v2"], repo_id)
    target = copy_of(checkpoints["v1"], tmp_path, "target")
    (target / "my_notes.txt").write_text("mine")
    assert pull_checkpoint(repo_id, local_dir=target) == target.resolve()
    assert same_weights(target, checkpoints["v2"])
    assert (target / "my_notes.txt").read_text() == "mine"
    assert {p.name for p in target.iterdir()} == PULLED | {PULL_RECORD, "my_notes.txt"}
    assert leftovers(tmp_path) == ["target"]


def user_project(folder: Path) -> Path:
    """A project folder of the user's with no checkpoint in it: a card showing a figure, results and a plot of
    their own (names a checkpoint also uses), and notes."""
    folder.mkdir()
    (folder / "README.md").write_text("# My project\n\n![accuracy](figure.png)\n")
    PIL.Image.new("RGB", (4, 4), (1, 2, 3)).save(folder / "figure.png")
    PIL.Image.new("RGB", (4, 4), (4, 5, 6)).save(folder / "training_curves.png")
    (folder / "all_results.json").write_text(json.dumps({"my_accuracy": 0.9}))
    (folder / "notes.txt").write_text("mine")
    return folder


def contents(folder: Path) -> dict[str, bytes | None]:
    """Each top-level file's bytes; None for a subfolder."""
    return {path.name: path.read_bytes() if path.is_file() else None for path in folder.iterdir()}


def test_pull_refuses_a_folder_of_the_users_files_before_any_request(
    hub, checkpoints, tmp_path, repo_id, capsys
):
    """A folder that holds no checkpoint and no pull record, but files a checkpoint would hold: the pull names
    them and the ways out, before any request; the script exits 1. With `--overwrite` the checkpoint replaces
    them, and the file no checkpoint holds stays."""
    push_checkpoint(checkpoints["v1"], repo_id)
    project = user_project(tmp_path / "project")
    before, requests = contents(project), len(hub.requests)
    with pytest.raises(HubError) as error:
        pull_checkpoint(repo_id, local_dir=project)
    message = str(error.value)
    assert (
        "README.md, all_results.json, figure.png, training_curves.png, which the pull would overwrite"
        in message
    )
    assert "notes.txt" not in message
    assert "Pull into an empty or new folder, or pass overwrite=True (--overwrite)" in message
    pull = load_script("scripts/pull_from_hub.py")
    with pytest.raises(SystemExit) as exit_info:
        pull.main([repo_id, "--local-dir", str(project)])
    assert exit_info.value.code == 1
    assert "README.md, all_results.json, figure.png, training_curves.png" in capsys.readouterr().err
    assert len(hub.requests) == requests  # refused before asking the Hub anything
    assert contents(project) == before
    assert leftovers(tmp_path) == ["project"]

    pull.main([repo_id, "--local-dir", str(project), "--overwrite"])
    assert same_weights(project, checkpoints["v1"])
    assert {p.name for p in project.iterdir()} == PULLED | {PULL_RECORD, "notes.txt"}
    assert (project / "notes.txt").read_text() == "mine"
    assert (project / "README.md").read_text() == CARD


def prepare(case: str, target: Path, pulled: Path) -> None:
    """Fill `target` as `case` says; `pulled` is a folder a pull made."""
    if case.startswith("pulled"):  # a pulled folder without its weights: no checkpoint, only a record
        shutil.copytree(pulled, target)
        (target / "model.safetensors").unlink()
        if case == "pulled-plus-results":
            (target / "all_results.json").write_text("{}")
        return
    target.mkdir()
    if case == "other-files":
        (target / "data.csv").write_text("a,b\n")
        (target / "runs").mkdir()
    elif case == "another-model":
        from transformers import ViTConfig, ViTModel

        vit = ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
        ViTModel(vit).save_pretrained(target)
    elif case == "config-alone":
        (target / "config.json").write_text(json.dumps({"model_type": "vitrail"}))
    elif case == "code-alone":
        (target / "modeling_vitrail.py").write_text("# my edits\n")


@pytest.mark.parametrize(
    "case, refused",
    [
        ("empty", []),
        ("other-files", []),
        ("pulled", []),
        ("pulled-plus-results", ["all_results.json"]),
        ("another-model", ["config.json", "model.safetensors"]),
        ("config-alone", ["config.json"]),
        ("code-alone", ["modeling_vitrail.py"]),
    ],
    ids=lambda value: value if isinstance(value, str) else "refused" if value else "replaced",
)
def test_pull_replaces_only_a_checkpoint_or_what_a_pull_recorded(
    hub, checkpoints, tmp_path, repo_id, case, refused
):
    """What a pull may replace in an existing folder: the files its record lists, and a vitrail checkpoint's
    (a config.json of model_type vitrail, with weights). A transformers ViT, a config without weights, a code
    file or results of the user's are refused by name, the folder left as it was; other files stay."""
    push_checkpoint(checkpoints["v2"], repo_id)
    pulled = pull_checkpoint(repo_id, local_dir=tmp_path / "pulled")
    push_checkpoint(checkpoints["v1"], repo_id)
    target = tmp_path / "target"
    prepare(case, target, pulled)
    before = contents(target)
    if refused:
        with pytest.raises(HubError, match=f"holds {', '.join(refused)}, which the pull would overwrite"):
            pull_checkpoint(repo_id, local_dir=target)
        assert contents(target) == before
    else:
        pull_checkpoint(repo_id, local_dir=target)
        assert same_weights(target, checkpoints["v1"])
        after = contents(target)
        assert {name: before[name] for name in set(before) - PULLED - {PULL_RECORD}} == {
            name: after[name] for name in set(after) - PULLED - {PULL_RECORD}
        }
    assert leftovers(tmp_path) == ["pulled", "target"]


def test_pull_refuses_a_users_file_the_repo_names_as_code_after_downloading(
    hub, checkpoints, tmp_path, repo_id
):
    """A code file's name is known only once config.json arrived: a user's `helpers.py` that the repo's auto_map
    names is refused before anything moves into the folder, and the downloads are cleaned up."""
    push_checkpoint(checkpoints["v1"], repo_id)
    config = json.loads((checkpoints["v1"] / "config.json").read_text())
    config["auto_map"]["AutoModelForMaskedImageModeling"] = "helpers.Model"
    hub.put(repo_id, {"config.json": json.dumps(config).encode(), "helpers.py": b"class Model: ...\n"})
    target = tmp_path / "target"
    target.mkdir()
    (target / "helpers.py").write_text("# mine\n")
    with pytest.raises(HubError, match="holds helpers.py, which the pull would overwrite"):
        pull_checkpoint(repo_id, local_dir=target)
    assert contents(target) == {"helpers.py": b"# mine\n"}
    assert leftovers(tmp_path) == ["target"]


def downloads(hub, repo_id: str) -> set[str]:
    """The names of the files the client asked the server for in `repo_id`."""
    return {path.rsplit("/", 1)[1] for _, path, _ in hub.requests if path.startswith(f"/{repo_id}/resolve/")}


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pull_replaces_the_other_weights_layout_and_records_the_revision(hub, checkpoints, tmp_path, repo_id):
    """Single-file v1, then sharded v2, then v1 again into one folder: each time the folder holds exactly that
    revision's checkpoint (no weights of the other layout to load instead) and a record of it."""
    target = tmp_path / "model"
    for name in ("v1", "v2_sharded", "v1"):
        commit = push_checkpoint(checkpoints[name], repo_id)
        pull_checkpoint(repo_id, local_dir=target)
        expected = checkpoint_files(checkpoints[name]) and set(PULLED) - {"model.safetensors"}
        expected |= {p.name for p in checkpoints[name].glob("model*.safetensors*")}
        assert {p.name for p in target.iterdir()} == expected | {PULL_RECORD}, name
        record = json.loads((target / PULL_RECORD).read_text())
        assert (
            record["repo_id"] == repo_id and record["revision"] == "main" and record["commit"] == commit.oid
        )
        assert record["files"] == {n: {"sha256": file_sha256(target / n)} for n in expected}
        with torch.no_grad():
            logits = AutoModelForImageClassification.from_pretrained(target)(checkpoints["inputs"]).logits
        assert torch.equal(logits, checkpoints[f"{name}_logits"]), name
    assert leftovers(tmp_path) == ["model"]


def test_a_pulled_folder_pushes_without_its_record(hub, checkpoints, tmp_path, repo_id):
    push_checkpoint(checkpoints["v1"], repo_id)
    folder = pull_checkpoint(repo_id, local_dir=tmp_path / "pulled")
    push_checkpoint(folder, f"{repo_id}-copy", include=["*"])
    assert set(hub.files(f"{repo_id}-copy")) == PULLED | {".gitattributes"}


def test_pull_fetches_only_the_code_auto_map_names(hub, checkpoints, tmp_path, caplog, repo_id):
    """Extra .py files in the repo (a torch.py would run on `import torch` from that folder) are not fetched,
    nor code auto_map takes from another repo: that is named in a warning."""
    push_checkpoint(checkpoints["v1"], repo_id)
    config = json.loads((checkpoints["v1"] / "config.json").read_text())
    config["auto_map"]["AutoModelForMaskedImageModeling"] = "someone/else--modeling_other.Model"
    extras = {"torch.py": b"raise SystemExit('owned')\n", "helpers.py": b"", "modeling_other.py": b""}
    hub.put(repo_id, {**extras, "config.json": json.dumps(config).encode()})
    for folder in (pull_checkpoint(repo_id, local_dir=tmp_path / "out"), pull_checkpoint(repo_id)):
        assert {p.name for p in folder.iterdir()} - {PULL_RECORD} == PULLED
    assert downloads(hub, repo_id) == PULLED
    assert "auto_map points at code in other repos (someone/else--modeling_other.Model)" in caplog.text


@pytest.mark.parametrize(
    "reference, message",
    [
        ("torch.VitrailForImageClassification", "torch.py, which would shadow the module 'torch'"),
        ("json.VitrailForImageClassification", "json.py, which would shadow the module 'json'"),
        ("sub/evil.VitrailForImageClassification", "'sub/evil.py', which is not a plain module file name"),
        ("class.VitrailForImageClassification", "'class.py', which is not a plain module file name"),
    ],
    ids=["torch", "json", "folder", "keyword"],
)
def test_pull_refuses_code_names_that_are_not_plain_or_shadow(
    hub, checkpoints, tmp_path, repo_id, reference, message
):
    """The names auto_map gives are checked before any code file is fetched."""
    push_checkpoint(checkpoints["v1"], repo_id)
    config = json.loads((checkpoints["v1"] / "config.json").read_text())
    config["auto_map"]["AutoModelForImageClassification"] = reference
    hub.put(repo_id, {"config.json": json.dumps(config).encode(), reference.split(".")[0] + ".py": b""})
    with pytest.raises(
        HubError,
        match=rf"pull '{repo_id}' \(revision 'main'\).*auto_map names the code file {re.escape(message)}",
    ):
        pull_checkpoint(repo_id, local_dir=tmp_path / "out")
    assert leftovers(tmp_path) == []
    assert downloads(hub, repo_id) == {"config.json", "preprocessor_config.json"}


def test_pull_refuses_shard_names_that_are_not_plain(hub, checkpoints, tmp_path, repo_id):
    """The index decides which files are fetched as weights: only plain .safetensors names in the repo's top level."""
    push_checkpoint(checkpoints["v2_sharded"], repo_id)
    index = json.loads((checkpoints["v2_sharded"] / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../outside.safetensors"
    hub.put(repo_id, {"model.safetensors.index.json": json.dumps(index).encode()})
    with pytest.raises(HubError, match="shards that are not plain .safetensors file names"):
        pull_checkpoint(repo_id, local_dir=tmp_path / "out")
    assert leftovers(tmp_path) == []
    assert downloads(hub, repo_id) == {
        "config.json",
        "preprocessor_config.json",
        "model.safetensors.index.json",
    }


def flip_last_byte(body: bytes) -> bytes:
    return body[:-1] + bytes([body[-1] ^ 1])


@pytest.mark.parametrize(
    "change, message",
    [
        (flip_last_byte, "modeling_vitrail.py does not match the sha the Hub lists for it"),
        (lambda body: body + b"\nimport os\n", "modeling_vitrail.py did not download intact"),
        (lambda body: body[:-10], "modeling_vitrail.py did not download intact"),
    ],
    ids=["altered", "longer", "shorter"],
)
def test_pull_refuses_a_file_that_does_not_match_the_listing(
    hub, checkpoints, tmp_path, repo_id, change, message
):
    """A body that differs from the tree sha, or is longer or shorter than the file's metadata says, is refused
    by name; nothing moves into place, and the cache keeps no bad copy (the next pull gets the real file)."""
    push_checkpoint(checkpoints["v1"], repo_id)
    hub.tamper_next(r"^GET /.*/resolve/.*/modeling_vitrail\.py$", change, count=2)
    with pytest.raises(HubError, match=rf"pull '{repo_id}' \(revision 'main'\).*{message}"):
        pull_checkpoint(repo_id, local_dir=tmp_path / "out")
    assert leftovers(tmp_path) == []
    with pytest.raises(HubError, match=message):
        pull_checkpoint(repo_id)

    folder = pull_checkpoint(repo_id)
    assert (folder / "modeling_vitrail.py").read_bytes() == (
        checkpoints["v1"] / "modeling_vitrail.py"
    ).read_bytes()


def test_pull_downloads_at_one_commit_while_the_branch_moves(hub, checkpoints, tmp_path, repo_id):
    """The branch moves to other weights after the pull resolved it: every file still comes from that commit."""
    v1 = push_checkpoint(checkpoints["v1"], repo_id)
    v2_weights = (checkpoints["v2"] / "model.safetensors").read_bytes()
    hub.before_next(r"/resolve/.*/config\.json$", lambda: hub.put(repo_id, {"model.safetensors": v2_weights}))
    folder = pull_checkpoint(repo_id, local_dir=tmp_path / "out")
    assert hub.head(repo_id).sha != v1.oid
    assert same_weights(folder, checkpoints["v1"])
    assert json.loads((folder / PULL_RECORD).read_text())["commit"] == v1.oid
    assert {path.split("/")[4] for _, path, _ in hub.requests if path.startswith(f"/{repo_id}/resolve/")} == {
        v1.oid
    }


def test_pull_missing_repo(hub, tmp_path):
    target = tmp_path / "models" / "nothing"
    with pytest.raises(HubError, match=rf"'{USER}/no-such-repo' \(revision 'main'\).*not found") as error:
        pull_checkpoint(f"{USER}/no-such-repo", local_dir=target)
    assert error.value.repo_id == f"{USER}/no-such-repo"
    assert leftovers(tmp_path / "models") == []


def test_pull_missing_revision(hub, checkpoints, tmp_path, repo_id):
    push_checkpoint(checkpoints["v1"], repo_id)
    with pytest.raises(HubError, match="has no revision 'nope'"):
        pull_checkpoint(repo_id, revision="nope", local_dir=tmp_path / "out")
    assert leftovers(tmp_path) == []


def test_pull_repo_without_weights(hub, checkpoints, tmp_path, repo_id):
    """A repo that lacks a file loading needs is refused by name, and nothing lands in the target."""
    api = HfApi()
    api.create_repo(repo_id)
    api.upload_file(
        path_or_fileobj=checkpoints["v1"] / "config.json", path_in_repo="config.json", repo_id=repo_id
    )
    with pytest.raises(HubError, match="not a complete vitrail checkpoint: it lacks model.safetensors"):
        pull_checkpoint(repo_id, local_dir=tmp_path / "out")
    assert leftovers(tmp_path) == []


def test_pull_server_error_leaves_nothing(hub, checkpoints, tmp_path, repo_id):
    push_checkpoint(checkpoints["v1"], repo_id)
    hub.fail_next(r"^GET /.*/resolve/.*/model\.safetensors$", status=503)
    with pytest.raises(HubError, match=rf"'{repo_id}' \(revision 'main'\).*server failed \(HTTP 503\)"):
        pull_checkpoint(repo_id, local_dir=tmp_path / "out")
    assert leftovers(tmp_path) == []

    hub.fail_next(r"^GET /api/models/", status=500)  # resolving the revision fails: an answer, not retried
    with pytest.raises(HubError, match=rf"'{repo_id}' \(revision 'main'\).*server failed \(HTTP 500\)"):
        pull_checkpoint(repo_id)


def test_pull_survives_one_dropped_connection(hub, checkpoints, tmp_path, repo_id):
    """huggingface_hub retries a cut download (from the start here: it had not yet written a 10 MB chunk, so
    there was nothing to resume from) and the pull completes with intact weights."""
    push_checkpoint(checkpoints["v1"], repo_id)
    hub.drop_next(r"^GET /.*/resolve/.*/model\.safetensors$", after_bytes=1000)
    folder = pull_checkpoint(repo_id, local_dir=tmp_path / "out")
    assert same_weights(folder, checkpoints["v1"])
    gets = [
        r
        for r in hub.requests
        if r[0] == "GET" and r[1].endswith(f"{repo_id}/resolve/{hub.head(repo_id).sha}/model.safetensors")
    ]
    assert len(gets) == 2

    # Larger files resume with "Range: bytes=N-"; the server answers it as the Hub's CDN does.
    url = f"{hub.url}/{repo_id}/resolve/main/model.safetensors"
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=1000-"})) as response:
        assert response.status == 206
        assert response.read() == (checkpoints["v1"] / "model.safetensors").read_bytes()[1000:]


def test_pull_dropped_connections_leave_nothing(hub, checkpoints, tmp_path, repo_id):
    push_checkpoint(checkpoints["v1"], repo_id)
    hub.drop_next(r"^GET /.*/resolve/.*/model\.safetensors$", count=100, after_bytes=0)
    with pytest.raises(HubError, match=rf"'{repo_id}'.*connection failed or was cut"):
        pull_checkpoint(repo_id, local_dir=tmp_path / "out")
    assert leftovers(tmp_path) == []


def test_offline_pull_from_the_cache(hub, checkpoints, monkeypatch, tmp_path, repo_id):
    push_checkpoint(checkpoints["v1"], repo_id)
    online = pull_checkpoint(repo_id)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    requests = len(hub.requests)

    assert pull_checkpoint(repo_id) == online
    assert same_weights(pull_checkpoint(repo_id, local_dir=tmp_path / "copy"), checkpoints["v1"])
    with torch.no_grad():
        logits = VitrailForImageClassification.from_pretrained(repo_id)(checkpoints["inputs"]).logits
    assert torch.equal(logits, checkpoints["v1_logits"])
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set and it is not in the local cache"):
        pull_checkpoint(f"{USER}/never-pulled")
    assert len(hub.requests) == requests  # offline means offline


def test_offline_pull_into_a_folder_pulled_before(hub, checkpoints, monkeypatch, tmp_path, repo_id):
    """A pull into local_dir bypasses the cache; offline, that folder is still usable, and only that one."""
    push_checkpoint(checkpoints["v1"], repo_id)
    target = pull_checkpoint(repo_id, local_dir=tmp_path / "model")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert pull_checkpoint(repo_id, local_dir=target) == target
    assert same_weights(target, checkpoints["v1"])
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set"):
        pull_checkpoint(repo_id)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set"):
        pull_checkpoint(repo_id, local_dir=tmp_path / "elsewhere")
    assert leftovers(tmp_path) == ["model"]


def test_offline_pull_into_a_folder_of_another_repo_is_refused(
    hub, checkpoints, monkeypatch, tmp_path, repo_id
):
    """Offline and not cached, a folder is taken as it is only when its record names this repo and revision:
    another repo's pull, another revision, or a checkpoint without a record is refused, and the script exits 1."""
    push_checkpoint(checkpoints["v1"], repo_id)
    push_checkpoint(checkpoints["v2"], f"{repo_id}-other")
    pulled = pull_checkpoint(f"{repo_id}-other", local_dir=tmp_path / "other")
    unrecorded = copy_of(checkpoints["v1"], tmp_path, "unrecorded")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    with pytest.raises(
        HubError, match=rf"HF_HUB_OFFLINE is set .*holds '{repo_id}-other' at revision 'main'"
    ):
        pull_checkpoint(repo_id, local_dir=pulled)
    with pytest.raises(
        HubError, match=rf"HF_HUB_OFFLINE is set .*holds '{repo_id}-other' at revision 'main'"
    ):
        pull_checkpoint(f"{repo_id}-other", revision="v2", local_dir=pulled)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set .*holds a checkpoint with no pull record"):
        pull_checkpoint(repo_id, local_dir=unrecorded)
    with pytest.raises(SystemExit) as exit_info:
        load_script("scripts/pull_from_hub.py").main([repo_id, "--local-dir", str(pulled)])
    assert exit_info.value.code == 1
    assert same_weights(pulled, checkpoints["v2"]) and same_weights(unrecorded, checkpoints["v1"])
    assert leftovers(tmp_path) == ["other", "unrecorded"]


# ---- time-outs and errors ----------------------------------------------------------------------------------


def test_a_silent_server_times_out(hub, checkpoints, tmp_path, repo_id):
    """A server that accepts connections and never answers: push and pull give up after the time-out and two
    retries, within seconds, naming the repo, the revision and the request that timed out."""
    hub.stall(".")
    stalled, started = len(hub.stalled), time.monotonic()
    with pytest.raises(
        HubError,
        match=rf"pull '{repo_id}' \(revision 'main'\).*did not answer GET \S+/api/models/{repo_id}"
        r" within 0\.3 s",
    ):
        pull_checkpoint(repo_id, local_dir=tmp_path / "out", timeout=0.3)
    with pytest.raises(
        HubError,
        match=rf"push to '{repo_id}' \(revision 'main'\).*did not answer POST \S+/api/repos/create within 0\.3 s",
    ):
        push_checkpoint(checkpoints["v1"], repo_id, timeout=0.3)
    assert len(hub.stalled) - stalled == 6  # three tries each
    assert (
        time.monotonic() - started < 20
    )  # 2 x (3 x 0.3 s + 1.5 s of backoff), and the check before the push
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("method", ["HEAD", "GET"])
def test_a_stalled_file_download_times_out(hub, checkpoints, monkeypatch, tmp_path, repo_id, method):
    """huggingface_hub retries a stalled file request itself (a file's metadata: 6 more tries, with a 60 s time-out
    of their own; its body: 5 more); the pull's time-out holds for each of them. The waits between tries are
    skipped here."""
    push_checkpoint(checkpoints["v1"], repo_id)
    hub.stall(rf"^{method} /{repo_id}/resolve/\w+/config\.json$")
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    started = time.monotonic()
    with pytest.raises(
        HubError,
        match=rf"pull '{repo_id}'.*did not answer {method} \S+/resolve/\w+/config\.json within 0\.2 s",
    ):
        pull_checkpoint(repo_id, local_dir=tmp_path / "out", timeout=0.2)
    assert time.monotonic() - started < 15
    assert leftovers(tmp_path) == []


OWN_CLIENT_PULL = """
import json, sys
import httpx2 as httpx
from huggingface_hub import get_session, set_client_factory
from vitrail.hub import pull_checkpoint

timeouts = []  # the time-out each request went out with, as the client's response hook saw it
set_client_factory(lambda: httpx.Client(
    follow_redirects=True,
    timeout=None,
    event_hooks={"response": [lambda response: timeouts.append(response.request.extensions["timeout"])]},
))
client = get_session()
pull_checkpoint(sys.argv[1], local_dir=sys.argv[2], timeout=7)
during, timeouts[:] = list(timeouts), []
get_session().get(sys.argv[3])
report = {
    "same_client": get_session() is client,
    "during": during,
    "after": timeouts,
    "request_hooks_after": len(get_session().event_hooks["request"]),
}
json.dump(report, open(sys.argv[-1], "w"))
"""


def test_time_outs_keep_the_users_client(hub, checkpoints, tmp_path, repo_id):
    """A client huggingface_hub was given with `set_client_factory` (a proxy, certificates) serves the pull: every
    request goes out with the pull's time-out, and afterwards the client is the user's as it was."""
    push_checkpoint(checkpoints["v1"], repo_id)
    report = tmp_path / "report.json"
    subprocess.run(
        [
            sys.executable,
            "-c",
            OWN_CLIENT_PULL,
            repo_id,
            tmp_path / "out",
            f"{hub.url}/api/models/{repo_id}",
            report,
        ],
        env=client_env(hub, tmp_path / "home", dict(os.environ)),
        check=True,
        timeout=300,
    )
    report = json.loads(report.read_text())
    assert report["same_client"]
    seven = {"connect": 7.0, "read": 7.0, "write": 7.0, "pool": 7.0}
    assert len(report["during"]) >= 4 and all(timeout == seven for timeout in report["during"])
    assert report["after"] == [{"connect": None, "read": None, "write": None, "pool": None}]
    assert report["request_hooks_after"] == 0
    assert same_weights(tmp_path / "out", checkpoints["v1"])


SIGTERM_PULL = "import sys\nfrom vitrail.hub import pull_checkpoint\npull_checkpoint(sys.argv[1], local_dir=sys.argv[2])\n"


def test_sigterm_during_a_pull_leaves_no_staging_folder(hub, checkpoints, tmp_path, repo_id):
    """SIGTERM while the weights download (the configs and code already staged): the process ends with the
    status SIGTERM gives, and the hidden staging folder is gone."""
    push_checkpoint(checkpoints["v1"], repo_id)
    hub.stall(rf"/{repo_id}/resolve/\w+/model\.safetensors$")
    stalled = len(hub.stalled)
    models = tmp_path / "models"
    process = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_PULL, repo_id, str(models / "m")],
        env=client_env(hub, tmp_path / "home", dict(os.environ)),
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while len(hub.stalled) == stalled and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    staged = leftovers(models)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert len(staged) == 1 and staged[0].startswith(".m.pull-"), (staged, stderr[-3000:])
    assert process.returncode == 143, stderr[-3000:]
    assert leftovers(models) == []


def test_pull_refuses_a_nul_byte_in_a_listed_name(hub, checkpoints, tmp_path, repo_id):
    push_checkpoint(checkpoints["v1"], repo_id)
    hub.put(repo_id, {"evil\0.py": b""})
    with pytest.raises(
        HubError,
        match=rf"pull '{repo_id}' \(revision 'main'\).*NUL byte \({re.escape(repr('evil' + chr(0) + '.py'))}\)",
    ):
        pull_checkpoint(repo_id, local_dir=tmp_path / "out")
    assert leftovers(tmp_path) == []


def test_pull_into_a_file_is_refused(hub, tmp_path):
    (tmp_path / "model").write_text("a file")
    requests = len(hub.requests)
    with pytest.raises(HubError, match=rf"pull '{USER}/x' \(revision 'v1'\).*local_dir \S+/model is a file"):
        pull_checkpoint(f"{USER}/x", revision="v1", local_dir=tmp_path / "model")
    assert len(hub.requests) == requests


@pytest.mark.parametrize("bad_id", ["a/b/c", "two--dashes", "x" * 100])
def test_an_invalid_repo_id_is_refused_before_any_request(hub, checkpoints, bad_id):
    requests = len(hub.requests)
    for action, call in (
        ("pull", lambda: pull_checkpoint(bad_id)),
        ("push to", lambda: push_checkpoint(checkpoints["v1"], bad_id)),
    ):
        with pytest.raises(HubError, match=rf"{action} '{bad_id}' \(revision 'main'\).*not a valid repo id"):
            call()
    assert len(hub.requests) == requests


# ---- scripts -----------------------------------------------------------------------------------------------


def test_scripts(hub, checkpoints, tmp_path, capsys, repo_id):
    push, pull = load_script("scripts/push_to_hub.py"), load_script("scripts/pull_from_hub.py")
    folder = copy_of(checkpoints["v2"], tmp_path)
    (folder / "notes.txt").write_text("shared on purpose")
    (folder / "data.csv").write_text("stays home")
    args = [str(folder), repo_id, "--revision", "exp", "--include", "*.txt", "--timeout", "5"]
    push.main([*args, "--commit-message", "try"])
    out = capsys.readouterr().out
    assert "pushed: " in out and "not pushed: data.csv\n" in out
    assert hub.head(repo_id, "exp").title == "try"
    assert "notes.txt" in hub.files(repo_id, "exp") and "data.csv" not in hub.files(repo_id, "exp")
    push.main(args)
    assert "unchanged" in capsys.readouterr().out

    pull.main([repo_id, "--revision", "exp", "--local-dir", str(tmp_path / "exp"), "--timeout", "5"])
    assert capsys.readouterr().out.strip() == str((tmp_path / "exp").resolve())
    assert same_weights(tmp_path / "exp", checkpoints["v2"])

    for script, argv in ((pull, [f"{USER}/missing"]), (push, [str(folder), "a/b/c"])):
        with pytest.raises(SystemExit) as exit_info:
            script.main(argv)
        assert exit_info.value.code == 1
        assert capsys.readouterr().err.startswith("error: Cannot ")


# ---- Hub-code path -----------------------------------------------------------------------------------------

REMOTE = textwrap.dedent(
    """
    import json
    import sys

    import PIL.Image
    import torch
    from safetensors.torch import load_file
    from transformers import (
        AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification, pipeline,
    )

    repo_id, reference_path, image_path, report_path = sys.argv[1:]
    ref = load_file(reference_path)
    image = PIL.Image.open(image_path)
    report = {}
    config = AutoConfig.from_pretrained(repo_id, trust_remote_code=True)
    classifier = AutoModelForImageClassification.from_pretrained(repo_id, trust_remote_code=True)
    branch = AutoModelForImageClassification.from_pretrained(repo_id, revision="v2", trust_remote_code=True)
    backbone = AutoModel.from_pretrained(repo_id, trust_remote_code=True)
    processor = AutoImageProcessor.from_pretrained(repo_id, trust_remote_code=True)
    report["classes"] = {
        name: [type(obj).__module__, type(obj).__name__]
        for name, obj in [("config", config), ("classifier", classifier), ("backbone", backbone),
                          ("processor", processor)]
    }
    with torch.no_grad():
        report["logits_equal"] = torch.equal(classifier(ref["inputs"]).logits, ref["v1_logits"])
        report["branch_logits_equal"] = torch.equal(branch(ref["inputs"]).logits, ref["v2_logits"])
        report["pooler_equal"] = torch.equal(backbone(ref["inputs"]).pooler_output, ref["v1_pooler"])
        pixels = processor(image, return_tensors="pt")["pixel_values"]
        report["pixels_equal"] = torch.equal(pixels, ref["pixels"])
    classify = pipeline("image-classification", model=repo_id, trust_remote_code=True)
    report["pipeline_model"] = type(classify.model).__module__
    report["classification"] = classify(image, top_k=None)
    report["vitrail_modules"] = sorted(n for n, m in sys.modules.items() if m and n.startswith("vitrail"))
    json.dump(report, open(report_path, "w"))
    """
)


def test_hub_code_path_from_the_repo_id(hub, checkpoints, tmp_path, repo_id):
    """Where vitrail cannot be imported, the Auto classes and the pipeline open the repo id with the code it
    carries and reproduce the pushed model exactly (main and a branch)."""
    push_checkpoint(checkpoints["v1"], repo_id)
    push_checkpoint(checkpoints["v2"], repo_id, revision="v2")
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (41, 37, 3), dtype=np.uint8))
    image.save(tmp_path / "image.png")
    model = VitrailForImageClassification.from_pretrained(checkpoints["v1"])
    processor = VitrailImageProcessor.from_pretrained(checkpoints["v1"])
    with torch.no_grad():
        pixels = processor(image, return_tensors="pt")["pixel_values"]
        reference = {
            "inputs": checkpoints["inputs"],
            "v1_logits": checkpoints["v1_logits"],
            "v2_logits": checkpoints["v2_logits"],
            "v1_pooler": model.vitrail(checkpoints["inputs"]).pooler_output,
            "pixels": pixels,
        }
        probabilities = model(pixels).logits.softmax(-1)[0]
    save_file({k: v.contiguous() for k, v in reference.items()}, tmp_path / "reference.safetensors")
    args = [repo_id, tmp_path / "reference.safetensors", tmp_path / "image.png"]
    report = run_without_vitrail(REMOTE, *args, root=tmp_path, env=client_env(hub, tmp_path / "remote_home"))

    assert report["vitrail_modules"] == []
    for name, class_name in {
        "config": "VitrailConfig",
        "classifier": "VitrailForImageClassification",
        "backbone": "VitrailModel",
        "processor": "VitrailImageProcessor",
    }.items():
        module, loaded = report["classes"][name]
        assert loaded == class_name and module.startswith("transformers_modules."), (name, module, loaded)
    assert report["logits_equal"] and report["branch_logits_equal"] and report["pooler_equal"]
    assert report["pixels_equal"]
    assert report["pipeline_model"].startswith("transformers_modules.")
    scores = {result["label"]: result["score"] for result in report["classification"]}
    assert scores.keys() == set(ID2LABEL.values())
    for label_id, label in ID2LABEL.items():
        assert scores[label] == pytest.approx(probabilities[label_id].item(), abs=1e-6)
    # The subprocess downloaded through the server: its HF_HOME holds the repo in the cache.
    assert (tmp_path / "remote_home" / "hub" / f"models--{repo_id.replace('/', '--')}").is_dir()


# ---- Trainer(push_to_hub=True) -----------------------------------------------------------------------------


def test_trainer_push_to_hub_uploads_the_code(hub, checkpoints, tmp_path, repo_id):
    """What transformers' own push does with a vitrail model: the code files travel (save_pretrained copies
    them), but the Trainer writes its README.md over any card and uploads its pickled training_args.bin."""
    from transformers import Trainer, TrainingArguments

    model = VitrailForImageClassification.from_pretrained(checkpoints["v1"])
    processor = VitrailImageProcessor.from_pretrained(checkpoints["v1"])
    data = [{"pixel_values": torch.randn(3, 30, 30), "labels": i % 3} for i in range(4)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        push_to_hub=True,
        hub_model_id=repo_id,
        hub_strategy="end",
        save_strategy="no",
        max_steps=1,
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=processor)
    assert repo_id in hub.repos  # the Trainer creates the repo at construction
    trainer.train()
    trainer.push_to_hub()

    files = hub.files(repo_id)
    assert {"model.safetensors", "config.json", "preprocessor_config.json", *CODE_FILES} <= set(files)
    assert "training_args.bin" in files  # a pickle: why scripts/train.py should push with vitrail.hub instead
    assert b"generated_from_trainer" in files["README.md"]  # the Trainer's card, written over any other


def train_tiny(out: Path, *extra: str) -> Path:
    """Four steps of `vitrail.training` (what `scripts/train.py` runs) on the digits with a tiny model."""
    from vitrail.training import parse_args, train

    overrides = (
        "image_size=8,patch_size=2,encoder_stride=2,num_channels=1,hidden_size=32,num_hidden_layers=2,"
        "num_attention_heads=4,intermediate_size=64,pooling=mean,use_cls_token=false"
    )
    common = ["--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true", "--max_steps", "4"]
    train(*parse_args(["--output_dir", str(out), "--config_overrides", overrides, *common, *extra]))
    return out


def test_train_py_output_round_trip(hub, tmp_path, repo_id):
    """A real `vitrail.training` output folder (a few steps on the digits, with checkpoint-* folders) passes
    the check, is pushed without its resume state, and pulls back as a loadable classifier."""
    out = train_tiny(tmp_path / "run", "--save_strategy", "steps", "--save_steps", "2")
    assert any(out.glob("checkpoint-*/optimizer.pt"))

    push_checkpoint(out, repo_id)
    files = hub.files(repo_id)
    assert set(files) == set(checkpoint_files(out)) | {".gitattributes"}
    assert {"model.safetensors", "README.md", "training_curves.png", "confusion_matrix.png"} <= set(files)
    assert not [name for name in files if "/" in name or name.endswith((".bin", ".pt", ".pth"))]
    assert b"vitrail" in files["README.md"]  # vitrail's card (its tags), not the Trainer's

    pulled = pull_checkpoint(repo_id, local_dir=tmp_path / "pulled")
    model = VitrailForImageClassification.from_pretrained(pulled)
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 8, 8)).logits.shape == (1, 10)


def test_train_py_push_to_hub(hub, tmp_path, repo_id):
    """`scripts/train.py --push_to_hub` pushes the finished folder through vitrail.hub: code, our card, plots and
    results, and neither the pickled training_args.bin nor the Trainer's card."""
    out = train_tiny(
        tmp_path / "run", "--save_strategy", "no", "--push_to_hub", "true", "--hub_model_id", repo_id
    )
    files = hub.files(repo_id)
    assert set(files) == set(checkpoint_files(out)) | {".gitattributes"}
    assert {*CODE_FILES, "model.safetensors", "README.md", "training_curves.png", "all_results.json"} <= set(
        files
    )
    assert "training_args.bin" not in files and b"generated_from_trainer" not in files["README.md"]
    assert repo_id.encode() in files["README.md"]  # the card's usage snippet names the repo


def test_pretrain_mim_push_to_hub_goes_through_vitrail_hub(hub, tmp_path, repo_id):
    """`scripts/pretrain_mim.py --push_to_hub` pushes like train.py: the checked folder, no pickle, loadable."""
    from transformers import TrainingArguments

    from vitrail import VitrailForMaskedImageModeling
    from vitrail.pretraining import PretrainArguments, pretrain
    from vitrail.training import DataArguments

    overrides = (
        "image_size=8,patch_size=2,encoder_stride=2,num_channels=1,hidden_size=32,num_hidden_layers=2,"
    )
    overrides += "num_attention_heads=4,intermediate_size=64"
    args = TrainingArguments(output_dir=str(tmp_path / "mim"), max_steps=2, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, push_to_hub=True, hub_model_id=repo_id)  # fmt: skip
    pretrain(PretrainArguments(config_overrides=overrides), DataArguments(max_train_samples=64), args)
    files = hub.files(repo_id)
    assert {*CODE_FILES, "model.safetensors", "config.json", "preprocessor_config.json"} <= set(files)
    assert "training_args.json" in files and not [name for name in files if name.endswith(".bin")]
    pulled = pull_checkpoint(repo_id, local_dir=tmp_path / "pulled")
    assert type(VitrailForMaskedImageModeling.from_pretrained(pulled)) is VitrailForMaskedImageModeling


def test_from_pretrained_converts_a_transformers_vit_repo(hub, tmp_path, repo_id):
    """A google/vit-style repo on the Hub (transformers' ViT, its own key layout) opens with vitrail's class: only
    config, weights and preprocessing are downloaded, then converted."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=30, patch_size=2, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=37, num_labels=3)  # fmt: skip
    reference = ViTForImageClassification(config).eval()
    source = tmp_path / "vit"
    reference.save_pretrained(source)
    (source / "notes.bin").write_bytes(b"never downloaded")
    api = HfApi()
    api.create_repo(repo_id)
    api.upload_folder(folder_path=str(source), repo_id=repo_id)
    model = VitrailForImageClassification.from_pretrained(repo_id)
    pixels = torch.randn(2, 3, 30, 30)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).logits, reference(pixels).logits, atol=1e-5, rtol=0)
    downloaded = {
        p.name for p in Path(constants.HF_HUB_CACHE).rglob("*") if p.is_file() and "snapshots" in str(p)
    }
    assert downloaded == {"config.json", "model.safetensors"}
