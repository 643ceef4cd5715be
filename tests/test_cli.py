"""The `mllama` entry point, run in a subprocess as a user would."""
from __future__ import annotations

import contextlib
import http.server
import io
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image

MLLAMA = str(Path(sys.executable).parent / "mllama")


def run(*args, stdin: str | None = None, env: dict | None = None, timeout: int = 240):
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    full_env.pop("MLLAMA_DEBUG", None)
    return subprocess.run([MLLAMA, *args], input=stdin, capture_output=True, text=True, env=full_env,
                          timeout=timeout)


# processes run side by side: one per CPU (an `mllama` start-up, importing torch, keeps one CPU busy), at most 4
TOGETHER = max(1, min(4, os.cpu_count() or 1))


def run_together(*calls: tuple) -> list[subprocess.CompletedProcess]:
    """`run(*args, **kwargs)` for each (args, kwargs) in `calls`, TOGETHER at a time: each is a separate `mllama`
    process and sees nothing of the others. The results come back in the order of `calls`."""
    with ThreadPoolExecutor(max_workers=TOGETHER) as pool:
        return list(pool.map(lambda call: run(*call[0], **call[1]), calls))


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("mllama: error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "cat.png"
    Image.radial_gradient("L").convert("RGB").resize((90, 60)).save(path)
    return path


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """The Python API's model and processor on the tiny checkpoint, which the CLI's answers are checked against
    (only read: generate and apply_chat_template)."""
    from mllama import AutoProcessor, MllamaForConditionalGeneration

    model = MllamaForConditionalGeneration.from_pretrained(tiny_checkpoint)
    return model, AutoProcessor.from_pretrained(tiny_checkpoint)


@contextlib.contextmanager
def running(*args, **kwargs):
    """`run(*args, **kwargs)` in its own process while the block computes what to expect; yields a future of its
    result."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool.submit(run, *args, **kwargs)


def test_create_tiny_writes_a_loadable_checkpoint(tmp_path, tokenizer_model_path):
    result = run("create-tiny", str(tmp_path / "tiny"), "--tokenizer", str(tokenizer_model_path))
    assert result.returncode == 0, result.stderr
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "preprocessor_config.json", "generation_config.json"):
        assert (tmp_path / "tiny" / name).is_file(), name


def test_generate_streams_what_generate_returns(tiny_checkpoint, image_path, reference):
    with running("generate", "--model", str(tiny_checkpoint), "--image", str(image_path), "--prompt",
                 "Describe the picture.", "--max-new-tokens", "12", "--greedy") as cli:
        model, processor = reference
        messages = [{"role": "user", "content": [{"type": "image", "path": str(image_path)},
                                                 {"type": "text", "text": "Describe the picture."}]}]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        expected = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    result = cli.result()
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_generate_raw_prompt_and_sampling_flags(tiny_checkpoint, image_path):
    args = ("generate", "--model", str(tiny_checkpoint), "--raw", "--image", str(image_path), "--prompt", "A photo of",
            "--max-new-tokens", "8", "--temperature", "1.3", "--top-k", "50", "--seed", "7")
    a, b = run_together((args, {}), (args, {}))  # two processes, the same seed
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.strip()


def test_chat_through_stdin(tiny_checkpoint, image_path, reference):
    script = f"/image {image_path}\nWhat is in this image?\nAnd the colours?\n/image /no/such.png\n/exit\n"
    with running("chat", "--model", str(tiny_checkpoint), "--max-new-tokens", "6", "--greedy", stdin=script) as cli:
        # the same two turns through the Python API: the history carries the image and the first reply
        model, processor = reference
        messages, replies = [], []
        for i, text in enumerate(["What is in this image?", "And the colours?"]):
            content = ([{"type": "image", "path": str(image_path)}] if i == 0 else []) + \
                [{"type": "text", "text": text}]
            messages.append({"role": "user", "content": content})
            inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True, return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
            replies.append(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
            messages.append({"role": "assistant", "content": replies[-1]})
    result = cli.result()
    assert result.returncode == 0, result.stderr
    assert "/no/such.png" in result.stderr  # a bad /image keeps the chat going
    assert result.stdout == f"(image attached: {image_path})\n{replies[0]}\n{replies[1]}\n"


def test_chat_system_message_with_image_is_reported_and_the_image_dropped(tiny_checkpoint, image_path, reference):
    script = f"/image {image_path}\nhello\nhello again\n"
    with running("chat", "--model", str(tiny_checkpoint), "--system", "Be brief.", "--max-new-tokens", "3",
                 "--greedy", stdin=script) as cli:
        # the next message goes without the image, after the system message alone
        model, processor = reference
        messages = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "text", "text": "hello again"}]}]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        reply = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    result = cli.result()
    assert result.returncode == 0
    assert result.stderr.count("incompatible with system messages") == 1
    assert "1 attached image(s) dropped" in result.stderr
    assert result.stdout == f"(image attached: {image_path})\n{reply}\n"


def test_an_interrupted_answer_stays_in_the_conversation_as_shown(tiny_checkpoint, image_path, monkeypatch):
    import argparse

    from mllama import AutoProcessor, cli

    def interrupted(model, processor, inputs, shown):
        shown.append("Once upon")
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_stream", interrupted)
    args = argparse.Namespace(system=None, max_new_tokens=5, temperature=None, top_p=None, top_k=None,
                              repetition_penalty=None, seed=None, greedy=True, sample=False)
    model = type("Model", (), {"device": torch.device("cpu")})()  # never called: _stream is replaced
    chat = cli.Chat(model, AutoProcessor.from_pretrained(tiny_checkpoint), args)
    chat.attach(str(image_path))
    assert chat.handle("Tell me a story.")
    assert chat.messages[-1] == {"role": "assistant", "content": "Once upon"} and not chat.pending
    assert chat.messages[0]["content"][0]["type"] == "image"


def test_chat_on_a_terminal_edits_lines_and_keeps_history(tiny_checkpoint):
    import pty

    from test_cli_interrupt import read_until

    master, slave = pty.openpty()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TERM": "xterm"}
    proc = subprocess.Popen([sys.executable, "-m", "mllama", "chat", "--model", str(tiny_checkpoint),
                             "--max-new-tokens", "2"], stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    seen = bytearray()
    try:
        read_until(master, b"> ", seen)
        os.write(master, b"/rset\x1b[D\x1b[D\x1b[De\r")  # three times left, then the missing "e": /reset
        read_until(master, b"(conversation cleared)", seen)
        read_until(master, b"> ", seen)
        os.write(master, b"\x1b[A\r")  # up: the line before
        read_until(master, b"(conversation cleared)", seen)
        read_until(master, b"> ", seen)
        os.write(master, b"\x04")  # Ctrl-D at the prompt leaves
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(master)


def test_bad_arguments_are_refused_before_the_model_loads(tmp_path):
    """--model names a folder that does not exist: each error must be the argument's, found first."""
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    nothing = str(tmp_path / "no-model")
    cases = [(["--dtype", "int8"], ["--dtype", "int8", "bfloat16, float16, float32"]),
             (["--device", "tpu"], ["--device tpu", "'cpu'"]),
             (["--image", str(not_image)], ["notes.png", "not in any image format"]),
             (["--image", str(tmp_path / "none.png")], ["none.png", "not found"]),
             (["--max-new-tokens", "0"], ["--max-new-tokens", ">= 1"]),
             (["--temperature", "0"], ["--temperature", "> 0"]),
             (["--top-k", "-1"], ["--top-k", ">= 0"]),
             (["--repetition-penalty", "0"], ["--repetition-penalty", "> 0"]),
             (["--threads", "0"], ["--threads 0", "1 or more"])]
    results = run_together(*[(("generate", "--model", nothing, "--prompt", "x", *flags), {}) for flags, _ in cases],
                           (("chat", "--model", nothing, "--dtype", "int8"), {}),
                           (("generate", "--model", nothing, "--prompt", "x"), {"env": {"MLLAMA_NUM_THREADS": "many"}}))
    for (_, fragments), result in zip(cases, results):
        assert_one_line_error(result, *fragments)
    assert_one_line_error(results[-2], "--dtype")
    assert_one_line_error(results[-1], "MLLAMA_NUM_THREADS='many'")


def test_a_prompt_that_is_not_utf8_is_named(tmp_path):
    commands = [[MLLAMA, "generate", "--model", str(tmp_path), "--prompt", b"caf\xe9 au lait"],
                [MLLAMA, "chat", "--model", str(tmp_path), "--system", b"\xff"]]
    with ThreadPoolExecutor(max_workers=TOGETHER) as pool:  # two separate processes, side by side
        prompt, system = pool.map(lambda command: subprocess.run(
            command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}), commands)
    assert_one_line_error(prompt, "--prompt is not valid UTF-8", "0xe9", "character 4")
    assert_one_line_error(system, "--system is not valid UTF-8", "0xff")


def test_version_and_python_dash_m():
    from importlib.metadata import version

    import mllama

    expected = f"mllama {version('mllama')}\n"
    assert mllama.__version__ == version("mllama")
    with ThreadPoolExecutor(max_workers=TOGETHER) as pool:  # two separate processes, side by side
        script = pool.submit(run, "--version")
        module = pool.submit(subprocess.run, [sys.executable, "-m", "mllama", "--version"], capture_output=True,
                             text=True)
        script, module = script.result(), module.result()
    assert script.stdout == expected
    assert module.returncode == 0 and module.stdout == expected


def test_threads_flag_and_environment_reach_torch(tiny_checkpoint, monkeypatch, capsys):
    from mllama import cli

    chosen = []
    monkeypatch.setattr(torch, "set_num_threads", chosen.append)
    monkeypatch.setenv("MLLAMA_NUM_THREADS", "3")
    base = ["--model", str(tiny_checkpoint), "--max-new-tokens", "1", "--greedy"]
    assert cli.main(["generate", "--prompt", "hi", "--threads", "2", *base]) == 0
    assert cli.main(["generate", "--prompt", "hi", *base]) == 0
    monkeypatch.delenv("MLLAMA_NUM_THREADS")
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 1.0, 1.0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # the chat ends at once
    assert cli.main(["chat", *base]) == 0
    assert chosen == [2, 3, 1]


def test_info_on_a_folder_and_a_preset(tiny_checkpoint):
    folder, preset = run_together((("info", str(tiny_checkpoint)), {}), (("info", "11b-instruct"), {}))
    assert folder.returncode == 0, folder.stderr
    assert "parameters:" in folder.stdout and "cross-attention at [2]" in folder.stdout
    assert "total 10,670,220,835" in preset.stdout
    assert "bfloat16 19.9 GiB" in preset.stdout


def test_missing_files_and_bad_arguments(tiny_checkpoint, tmp_path):
    cases = [(("generate", "--model", str(tiny_checkpoint), "--image", str(tmp_path / "none.png"), "--prompt", "x"),
              ["none.png"]),
             (("generate", "--model", str(tmp_path / "nothing"), "--prompt", "x"), ["nothing"]),
             (("generate", "--model", str(tiny_checkpoint), "--prompt", "x", "--dtype", "float99"), ["float99"]),
             (("generate", "--model", str(tiny_checkpoint), "--prompt", "x", "--top-p", "3"), ["--top-p", "(0, 1]"]),
             (("generate", "--model", str(tiny_checkpoint), "--prompt", "x", "--device", "cuda"), ["CUDA"]),
             (("create-tiny", str(tmp_path / "t"), "--tokenizer", str(tmp_path / "tok.model")), ["tok.model"])]
    *results, usage = run_together(*[(args, {}) for args, _ in cases], (("generate", "--max-new-tokens", "x"), {}))
    for (_, fragments), result in zip(cases, results):
        assert_one_line_error(result, *fragments)
    assert usage.returncode == 2 and "Traceback" not in usage.stderr


def test_unreachable_hub_repo_is_one_line():
    assert_one_line_error(run("info", "some-org/some-model"), "some-org/some-model")


class _GatedHub(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(403)
        self.send_header("X-Error-Code", "GatedRepo")
        self.send_header("X-Error-Message", "Access to model is restricted")
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": "Access to model is restricted"}')

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def fake_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _GatedHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_gated_hub_repo_is_one_line(tmp_path):
    with fake_hub() as endpoint:
        result = run("download", "meta-llama/Llama-3.2-11B-Vision-Instruct",
                     env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path)})
    assert_one_line_error(result, "gated", "HF_TOKEN")
