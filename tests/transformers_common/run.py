"""Run transformers' own common model tests (`ModelTesterMixin`, the bar every in-tree model passes) over vitrail's
three classes: `make test-transformers` (about a minute; needs PyPI for the transformers sdist).

The mixin lives in transformers' source distribution, not in its wheel, so this downloads the sdist of the
installed transformers version, unpacks its `tests/` package into `.venv/transformers-tests/`, adds vitrail's
ViT-style tester (`vitrail_common_tests.py`, beside this file) and runs it. The sdist lacks two packages that
`test_modeling_common.py` imports for mixins vitrail does not use (`tests/exporters`, the torch.export mixin, and
`tests/generation`, text generation); they are stood in for by empty classes, so those tests do not run here.
"""

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TARGET = ROOT / ".venv" / "transformers-tests" / transformers.__version__
EMPTY_MIXINS = {
    "exporters/test_export.py": "ExportTesterMixin",
    "generation/test_utils.py": "GenerationTesterMixin",
}


def unpack_tests() -> Path:
    tests = TARGET / "tests"
    if (tests / "test_modeling_common.py").is_file():
        return tests
    with tempfile.TemporaryDirectory() as download:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             f"transformers=={transformers.__version__}", "-d", download],
            check=True,
        )  # fmt: skip
        archive = next(Path(download).glob("transformers-*.tar.gz"))
        with tarfile.open(archive) as sdist:
            prefix = f"transformers-{transformers.__version__}/tests/"
            members = [m for m in sdist.getmembers() if m.name.startswith(prefix) and m.isfile()]
            for member in members:
                member.name = member.name[len(prefix) :]
            sdist.extractall(tests, members=members, filter="data")
    for package in ("", "exporters", "generation", "utils"):
        (tests / package).mkdir(exist_ok=True)
        (tests / package / "__init__.py").touch()
    for path, mixin in EMPTY_MIXINS.items():
        if not (tests / path).exists():
            (tests / path).write_text(
                f"class {mixin}:  # not in the sdist; vitrail does not use it\n    pass\n"
            )
    return tests


def main() -> int:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "parameterized"], check=True)
    tests = unpack_tests()
    shutil.copyfile(HERE / "vitrail_common_tests.py", tests / "test_vitrail_common.py")
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-rfs",
        "tests/test_vitrail_common.py",
    ]
    return subprocess.run(command + sys.argv[1:], cwd=TARGET).returncode


if __name__ == "__main__":
    sys.exit(main())
