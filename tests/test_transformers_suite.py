"""bench/transformers_suite.py: the rebinding plugin really puts mllama's classes where transformers' tests
look them up, and the report counts outcomes and names every test lost on mllama."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import transformers_suite as suite  # noqa: E402

CHECK_REBIND = """
import transformers_suite_rebind, mllama, transformers
from transformers import MllamaForConditionalGeneration, MllamaProcessor
from transformers.models.mllama.configuration_mllama import MllamaTextConfig
from transformers.models.auto.image_processing_auto import get_image_processor_class_from_name
assert MllamaForConditionalGeneration is mllama.MllamaForConditionalGeneration
assert MllamaProcessor is mllama.MllamaProcessor and MllamaTextConfig is mllama.MllamaTextConfig
assert get_image_processor_class_from_name("MllamaImageProcessor") is mllama.MllamaImageProcessor
assert get_image_processor_class_from_name("MllamaImageProcessorPil") is mllama.MllamaImageProcessorPil
assert transformers.AutoTokenizer.__module__.startswith("transformers.")  # not a class under test: untouched
print("rebound", len(transformers_suite_rebind.BINDINGS))
"""


def test_the_plugin_rebinds_every_class_under_test_where_the_tests_import_it():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "bench"), str(ROOT / "src")]))
    done = subprocess.run([sys.executable, "-c", CHECK_REBIND], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("rebound")


def _junit(path: Path, cases: dict[str, str]) -> Path:
    body = []
    for name, outcome in cases.items():
        inner = {"passed": "", "failed": '<failure message="AssertionError: 1 != 2">tb</failure>',
                 "error": '<error message="OSError: no file">tb</error>', "skipped": '<skipped message="why"/>'}[outcome]
        body.append(f'<testcase classname="tests.models.mllama.test_modeling_mllama.FooTest" name="{name}">'
                    f'{inner}</testcase>')
    path.write_text(f'<testsuites><testsuite name="pytest">{"".join(body)}</testsuite></testsuites>')
    return path


def test_the_report_counts_outcomes_and_lists_what_mllama_loses(tmp_path):
    theirs = suite.read_junit(_junit(tmp_path / "t.xml", {"test_a": "passed", "test_b": "passed", "test_c": "skipped"}))
    ours = suite.read_junit(_junit(tmp_path / "m.xml", {"test_a": "passed", "test_b": "failed", "test_c": "error"}))
    text = suite.report({"transformers": theirs, "mllama": ours}, "header")
    assert "| mllama | all | 3 | 1 | 1 | 1 | 0 |" in text and "| transformers | all | 3 | 2 | 0 | 0 | 1 |" in text
    assert "Passing on transformers: 2; of those, passing on mllama: 1; not passing on mllama: 1." in text
    assert "`test_modeling_mllama.py::FooTest::test_b`: failed: AssertionError: 1 != 2" in text
    assert "test_c`" not in text  # not passing on transformers either: not a loss
