"""Run transformers' own Mllama tests against mllama and against transformers, and print the table.

    python bench/transformers_suite.py --transformers-src PATH [--against both|mllama|transformers]
                                       [--out PREFIX] [--hub auto|standin|online] [-- PYTEST_ARGS...]

PATH is a checkout of huggingface/transformers (a v5.x tag or main). Its three Mllama test files
(`tests/models/mllama/test_{modeling,processing,image_processing}_mllama.py`) run unchanged, with the common
mixins, `conftest.py` and `utils/` of the same checkout, copied into a scratch folder (the other models' tests
are left out). Against mllama, the pytest plugin `bench/transformers_suite_rebind.py` rebinds the Mllama classes
under test to mllama's before any test module is imported; no assertion is changed.

Run it with the interpreter whose installed transformers is the checkout's own version (the common mixins import
transformers internals that move between releases): the script refuses a mismatch unless `--allow-version-mismatch`.
mllama is imported from this repository's `src/`.

The processor tests load two Hub repositories (`hf-internal-testing/tiny-processor-mllama` and
`hf-internal-testing/mllama-11b`). Where the Hub cannot be reached (`--hub auto` tries it), both are replaced
by a local stand-in in a private HF cache, run offline: the Llama 3.2 Vision instruct processor built from
Meta's tokenizer.model (the llama-models wheel, converted by mllama's converter) and the default image
processor. Both runs use the same stand-ins, so the comparison stays like for like; the table says which was used.

Output: the table on stdout, and with `--out PREFIX` the files PREFIX.md (table, and every test that passes on
transformers but not on mllama with its first error line) and PREFIX.json (every test's outcome on each side).
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
TEST_FILES = ("test_modeling_mllama.py", "test_processing_mllama.py", "test_image_processing_mllama.py")
HUB_REPOS = ("hf-internal-testing/tiny-processor-mllama", "hf-internal-testing/mllama-11b")
STANDIN_REVISION = "0" * 40
OUTCOMES = ("passed", "failed", "error", "skipped")


def checkout_version(src: Path) -> str:
    text = (src / "src/transformers/__init__.py").read_text()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def copy_suite(src: Path, work: Path) -> Path:
    """The checkout's test tree with only the Mllama model tests; returns the Mllama test folder."""
    for name in ("conftest.py", "pyproject.toml", "setup.cfg"):
        if (src / name).is_file():
            shutil.copy2(src / name, work / name)
    shutil.copytree(src / "utils", work / "utils")
    shutil.copytree(src / "tests", work / "tests", ignore=lambda folder, names: (
        [n for n in names if n not in ("__init__.py", "mllama")] if Path(folder) == src / "tests/models" else []))
    return work / "tests/models/mllama"


def hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(HUB_REPOS[0], timeout=10)
        return True
    except Exception:  # any failure to reach the Hub means the stand-ins are used
        return False


def meta_tokenizer_model() -> Path:
    spec = importlib.util.find_spec("llama_models")
    if spec is None:
        sys.exit("the stand-in processor needs Meta's tokenizer.model: pip install --no-deps llama-models==0.3.0")
    return Path(list(spec.submodule_search_locations)[0]) / "llama3" / "tokenizer.model"


def build_standins(home: Path) -> None:
    """A private HF cache holding the instruct processor under each Hub id the processor tests load."""
    sys.path.insert(0, str(REPO / "src"))
    from mllama import MllamaConfig, MllamaImageProcessor
    from mllama.processing.convert_tiktoken import convert

    home.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="standin-", dir=home))
    convert(meta_tokenizer_model(), folder, instruct=True)
    MllamaImageProcessor().save_pretrained(folder)
    MllamaConfig().save_pretrained(folder)
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": "MllamaProcessor"}) + "\n")
    for repo_id in HUB_REPOS:
        cache = home / "hub" / ("models--" + repo_id.replace("/", "--"))
        (cache / "refs").mkdir(parents=True)
        (cache / "refs/main").write_text(STANDIN_REVISION)
        shutil.copytree(folder, cache / "snapshots" / STANDIN_REVISION)


def run_side(side: str, tests: Path, work: Path, env: dict, pytest_args: list[str]) -> dict[str, dict]:
    junit = work / f"junit-{side}.xml"
    cmd = [sys.executable, "-m", "pytest", *[str(tests / f) for f in TEST_FILES], "-q", "-p", "no:cacheprovider",
           "--tb=native", f"--junitxml={junit}", *pytest_args]
    if side == "mllama":
        cmd[3:3] = ["-p", "transformers_suite_rebind"]
    print(f"[{side}] {' '.join(cmd[1:])}", flush=True)
    done = subprocess.run(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail = done.stdout.strip().splitlines()[-1:] or ["(no output)"]
    print(f"[{side}] pytest exit {done.returncode}: {tail[0]}", flush=True)
    (work / f"pytest-{side}.log").write_text(done.stdout)
    if not junit.is_file():
        sys.exit(f"[{side}] pytest wrote no report; its output is in {work / f'pytest-{side}.log'}")
    return read_junit(junit)


def read_junit(path: Path) -> dict[str, dict]:
    results = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname').split('.')[-2]}.py::{case.get('classname').split('.')[-1]}::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = first_line(child.get("message") or child.text or "")
                break
        results[test_id] = {"outcome": outcome, "message": message}
    return results


def first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0][:240] if lines else ""


def table(results: dict[str, dict[str, dict]]) -> str:
    rows = ["| against | file | tests | passed | failed | errors | skipped |", "|---|---|---:|---:|---:|---:|---:|"]
    for side, cases in results.items():
        per_file = collections.defaultdict(collections.Counter)
        for test_id, case in cases.items():
            per_file[test_id.split("::")[0]][case["outcome"]] += 1
            per_file["all"][case["outcome"]] += 1
        for name, count in sorted(per_file.items(), key=lambda item: item[0] == "all"):
            cells = [str(count[o]) for o in OUTCOMES]
            rows.append(f"| {side} | {name} | {sum(count.values())} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def regressions(results: dict[str, dict[str, dict]]) -> list[tuple[str, dict]]:
    ours, theirs = results.get("mllama", {}), results.get("transformers", {})
    return [(test_id, ours.get(test_id, {"outcome": "missing", "message": "not run"}))
            for test_id, case in sorted(theirs.items())
            if case["outcome"] == "passed" and ours.get(test_id, {}).get("outcome") != "passed"]


def report(results, header: str) -> str:
    lines = [header, "", table(results)]
    if {"mllama", "transformers"} <= results.keys():
        passing = [t for t, case in results["transformers"].items() if case["outcome"] == "passed"]
        both = sum(results["mllama"].get(t, {}).get("outcome") == "passed" for t in passing)
        gaps = regressions(results)
        lines += ["", f"Passing on transformers: {len(passing)}; of those, passing on mllama: {both}; "
                  f"not passing on mllama: {len(gaps)}.", ""]
        lines += [f"- `{test_id}`: {case['outcome']}: {case['message']}" for test_id, case in gaps]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transformers-src", type=Path, required=True, help="a huggingface/transformers checkout")
    parser.add_argument("--against", choices=("both", "mllama", "transformers"), default="both")
    parser.add_argument("--out", type=Path, help="write PREFIX.md and PREFIX.json")
    parser.add_argument("--hub", choices=("auto", "standin", "online"), default="auto",
                        help="auto: the Hub when reachable, else the stand-ins")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (its path is printed)")
    parser.add_argument("--allow-version-mismatch", action="store_true")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import transformers

    src = args.transformers_src.resolve()
    wanted = checkout_version(src)
    if transformers.__version__ != wanted and not args.allow_version_mismatch:
        sys.exit(f"transformers {transformers.__version__} is installed but the checkout is {wanted}: install the "
                 f"checkout (pip install --no-deps {src}) or pass --allow-version-mismatch")
    work = Path(tempfile.mkdtemp(prefix="transformers-suite-"))
    tests = copy_suite(src, work)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(BENCH), str(REPO / "src"), str(work), os.environ.get("PYTHONPATH", "")]))
    hub = args.hub if args.hub != "auto" else ("online" if hub_reachable() else "standin")
    if hub == "standin":
        build_standins(work / "hf-home")
        env.update(HF_HOME=str(work / "hf-home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    sides = ("transformers", "mllama") if args.against == "both" else (args.against,)
    results = {side: run_side(side, tests, work, env, args.pytest_args) for side in sides}
    header = (f"transformers' Mllama tests from {src} (transformers {wanted}; installed {transformers.__version__}), "
              f"Python {sys.version.split()[0]}, Hub repositories: {hub}")
    text = report(results, header)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.md").write_text(text)  # appended: a prefix like ...-5.16.0.dev0 has dots of its own
        Path(f"{args.out}.json").write_text(json.dumps({"header": header, "results": results}, indent=1) + "\n")
    if args.keep:
        print(f"scratch folder: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
