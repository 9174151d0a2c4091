"""Hub sharing: push, pull and load vitrail checkpoints against a Hub-protocol server on 127.0.0.1.

The server (`tests/hub_server.py`) keeps repos in memory and speaks the protocol huggingface_hub 2.4 uses; the
client in this process is repointed at it per test (fresh HF_HOME, dummy token), and the Hub-code check runs
in a subprocess that cannot import vitrail and reaches the server through HF_ENDPOINT, as a user's machine
would.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from huggingface_hub import HfApi, constants
from safetensors.torch import load_file, save_file

from vitrail import VitrailForImageClassification, VitrailImageProcessor
from vitrail.hub import (
    CheckpointError,
    HubError,
    check_checkpoint,
    checkpoint_files,
    pull_checkpoint,
    push_checkpoint,
)

from .conftest import tiny_config
from .hub_server import USER, client_env, patch_client, serve

ROOT = Path(__file__).resolve().parents[1]
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


def make_checkpoint(folder: Path, seed: int) -> Path:
    """A trained-like folder: weights far from the initialisation, processor, card, a plot and results."""
    config = tiny_config(num_labels=3, id2label=ID2LABEL, label2id={v: k for k, v in ID2LABEL.items()})
    model = VitrailForImageClassification(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    model.save_pretrained(folder)
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
    for name, seed in (("v1", 0), ("v2", 1)):
        folder = make_checkpoint(root / name, seed)
        with torch.no_grad():
            made[f"{name}_logits"] = VitrailForImageClassification.from_pretrained(folder)(inputs).logits
        made[name] = folder
    assert not torch.allclose(made["v1_logits"], made["v2_logits"])
    return made


@pytest.fixture(scope="module")
def server():
    with serve() as hub_server:
        yield hub_server


@pytest.fixture
def hub(server, monkeypatch, tmp_path):
    """The server, with this process's huggingface_hub pointed at it and a fresh HF_HOME."""
    patch_client(monkeypatch, server, tmp_path / "hf_home")
    server.unhandled.clear()
    yield server
    server.clear_faults()
    assert server.unhandled == [], "the client used routes the test server does not implement"


@pytest.fixture
def repo_id(request) -> str:
    return f"{USER}/{request.node.name.replace('[', '-').replace(']', '')}"


def copy_of(folder: Path, tmp_path: Path, name: str = "ckpt") -> Path:
    return Path(shutil.copytree(folder, tmp_path / name))


def same_weights(folder_a, folder_b) -> bool:
    a, b = load_file(Path(folder_a) / "model.safetensors"), load_file(Path(folder_b) / "model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def leftovers(parent: Path) -> list[str]:
    """What a test's folder holds besides the per-test HF_HOME."""
    return sorted(path.name for path in parent.iterdir() if path.name != "hf_home")


# ---- push --------------------------------------------------------------------------------------------------


def test_push_uploads_the_checkpoint_files_only(hub, checkpoints, tmp_path, repo_id):
    """One commit with the checkpoint's files, byte for byte; no subfolders, no stray top-level files."""
    folder = copy_of(checkpoints["v1"], tmp_path)
    (folder / "checkpoint-3").mkdir()
    (folder / "checkpoint-3" / "optimizer.pt").write_bytes(b"resume state stays local")
    (folder / "notes.txt").write_text("not part of a checkpoint")

    commit = push_checkpoint(folder, repo_id)

    files = hub.files(repo_id)
    assert set(files) == SHARED | {".gitattributes"}
    for name in SHARED:
        assert files[name] == (folder / name).read_bytes(), name
    assert hub.commit_count(repo_id) == 2  # the repo's initial commit and ours
    assert commit.oid == hub.head(repo_id).sha
    assert commit.commit_url == f"{hub.url}/{repo_id}/commit/{commit.oid}"
    assert hub.head(repo_id).title == "Upload vitrail checkpoint ckpt"
    assert hub.repos[repo_id].private is False


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
    with pytest.raises(ValueError, match="branch name"):
        push_checkpoint(checkpoints["v1"], repo_id, revision="a" * 40)


def test_push_server_error_makes_no_commit(hub, checkpoints, repo_id):
    push_checkpoint(checkpoints["v1"], repo_id)
    commits = hub.commit_count(repo_id)
    hub.fail_next(r"^POST /api/models/.*/commit/", status=500)
    with pytest.raises(HubError, match=rf"'{repo_id}' \(revision 'v2'\).*server failed \(HTTP 500\)"):
        push_checkpoint(checkpoints["v2"], repo_id, revision="v2")
    assert hub.commit_count(repo_id) == commits
    assert hub.head(repo_id, "v2").sha == hub.head(repo_id, "main").sha  # the branch exists, unchanged


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
        "code files missing: modeling_vitrail.py",
    ),
    "no processor": (lambda f: (f / "preprocessor_config.json").unlink(), "no preprocessor_config.json"),
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
    assert {p.name for p in (tmp_path / "old").iterdir()} == PULLED
    assert leftovers(tmp_path) == ["main", "old"]


def test_from_pretrained_on_the_repo_id_in_process(hub, checkpoints, repo_id):
    push_checkpoint(checkpoints["v1"], repo_id)
    push_checkpoint(checkpoints["v2"], repo_id, revision="v2")
    with torch.no_grad():
        for revision, name in ((None, "v1"), ("v2", "v2")):
            model = VitrailForImageClassification.from_pretrained(repo_id, revision=revision)
            assert torch.equal(model(checkpoints["inputs"]).logits, checkpoints[f"{name}_logits"]), revision


def test_pull_into_an_existing_folder_replaces_checkpoint_files_only(hub, checkpoints, tmp_path, repo_id):
    push_checkpoint(checkpoints["v2"], repo_id)
    target = copy_of(checkpoints["v1"], tmp_path, "target")
    (target / "my_notes.txt").write_text("mine")
    assert pull_checkpoint(repo_id, local_dir=target) == target.resolve()
    assert same_weights(target, checkpoints["v2"])
    assert (target / "my_notes.txt").read_text() == "mine"
    assert not (target / ".cache").exists()
    assert leftovers(tmp_path) == ["target"]


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

    hub.fail_next(r"^GET /api/models/", status=500)  # the listing itself fails, and nothing is cached
    with pytest.raises(HubError, match=r"server failed \(HTTP 500\).*no complete copy in the local cache"):
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


# ---- scripts -----------------------------------------------------------------------------------------------


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scripts(hub, checkpoints, tmp_path, capsys, repo_id):
    push, pull = load_script("push_to_hub"), load_script("pull_from_hub")
    push.main([str(checkpoints["v2"]), repo_id, "--revision", "exp", "--commit-message", "try"])
    assert "pushed: " in capsys.readouterr().out
    assert hub.head(repo_id, "exp").title == "try"
    push.main([str(checkpoints["v2"]), repo_id, "--revision", "exp"])
    assert "unchanged" in capsys.readouterr().out

    pull.main([repo_id, "--revision", "exp", "--local-dir", str(tmp_path / "exp")])
    assert capsys.readouterr().out.strip() == str((tmp_path / "exp").resolve())
    assert same_weights(tmp_path / "exp", checkpoints["v2"])

    with pytest.raises(SystemExit) as exit_info:
        pull.main([f"{USER}/missing"])
    assert exit_info.value.code == 1
    assert "not found" in capsys.readouterr().err


# ---- Hub-code path -----------------------------------------------------------------------------------------

REMOTE = textwrap.dedent(
    """
    import sys
    sys.modules["vitrail"] = None  # vitrail is installed (editable): block it so only the repo's code runs
    import json

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
    workdir = (
        tmp_path / "elsewhere"
    )  # an empty cwd: neither src/ nor a checkpoint's code is importable by accident
    workdir.mkdir()
    env = client_env(
        hub, tmp_path / "remote_home", {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    )
    args = [repo_id, tmp_path / "reference.safetensors", tmp_path / "image.png", tmp_path / "report.json"]
    result = subprocess.run(
        [sys.executable, "-c", REMOTE, *map(str, args)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    report = json.loads((tmp_path / "report.json").read_text())

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
