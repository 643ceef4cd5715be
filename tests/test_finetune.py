"""`mllama finetune` on the tiny checkpoint (CPU, fp32): LoRA overfits a small data set, a run killed after a
checkpoint and resumed ends at the same weights as an uninterrupted one, full fine-tuning writes a model that
loads, bad lines are reported by number (skipped, or fatal with --strict), and bad options are refused."""
from __future__ import annotations

import io
import json

import pytest
import torch

pytest.importorskip("peft")

from mllama.cli import main  # noqa: E402
from mllama.finetune import train as train_module  # noqa: E402
from mllama.finetune.train import FinetuneError, Options, train  # noqa: E402


def _data(folder, lines: list[str]):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _chat(question: str, answer: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": question},
                                    {"role": "assistant", "content": answer}]})


DATA = [_chat(f"Say the word number {i}", answer) for i, answer in enumerate(["apple", "river", "stone", "cloud"])]


def _options(tiny_checkpoint, tmp_path, **kwargs) -> Options:
    data = _data(tmp_path, DATA)
    base = dict(model=str(tiny_checkpoint), data=str(data), output=str(tmp_path / "out"), lora_rank=8,
                lora_alpha=16, lr=2e-2, batch_size=2, log=io.StringIO(), gradient_checkpointing=False)
    return Options(**{**base, **kwargs})


def test_lora_overfits_a_small_data_set_and_writes_an_adapter(tiny_checkpoint, tmp_path):
    # The tiny checkpoint's random lm_head (std 0.02 over 64 dimensions) bounds every logit near 1: adapters on
    # the layers alone cannot make one token of 128k likely, so the lm_head gets one too.
    # (The four prompts differ in one digit, which the tiny model does not learn to tell apart in 50 steps: the
    # loss ends near ln(4) / 2, the first answer token a guess among four, its end token sure.)
    options = _options(tiny_checkpoint, tmp_path, max_steps=50, lr=3e-2, gradient_checkpointing=True,
                       lora_targets=train_module.LORA_TARGETS + ("lm_head",))
    result = train(options)
    losses = [loss for _, loss in result["history"]["train"]]
    assert len(losses) == 50 and sum(losses[-4:]) / 4 < 0.1 * losses[0], losses
    assert "step 50/50" in options.log.getvalue() and "samples/s" in options.log.getvalue()
    out = tmp_path / "out"
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from mllama import MllamaForConditionalGeneration

    model = MllamaForConditionalGeneration.from_pretrained(str(tiny_checkpoint), dtype=torch.float32)
    model.load_adapter(out)  # the adapter loads back (transformers' API)
    assert model.active_adapters() == ["default"]


def test_a_killed_and_resumed_run_ends_at_the_same_weights(tiny_checkpoint, tmp_path, monkeypatch):
    whole = train(_options(tiny_checkpoint, tmp_path / "a", max_steps=6, save_every=3, grad_accum=2,
                           batch_size=1, warmup_steps=2, eval_fraction=0.25))
    real = train_module._save_checkpoint

    def save_then_die(folder, *args):
        real(folder, *args)
        raise KeyboardInterrupt  # killed right after its first checkpoint

    monkeypatch.setattr(train_module, "_save_checkpoint", save_then_die)
    killed = _options(tiny_checkpoint, tmp_path / "b", max_steps=6, save_every=3, grad_accum=2, batch_size=1,
                      warmup_steps=2, eval_fraction=0.25)
    with pytest.raises(KeyboardInterrupt):
        train(killed)
    monkeypatch.setattr(train_module, "_save_checkpoint", real)
    killed.resume = True
    resumed = train(killed)
    assert "resumed from" in killed.log.getvalue() and resumed["history"] == whole["history"]
    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "out" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "out" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_fine_tuning_writes_a_model_that_loads(tiny_checkpoint, tmp_path):
    train(_options(tiny_checkpoint, tmp_path, full=True, freeze=("vision", "projector"), max_steps=2, lr=1e-3))
    from mllama import MllamaForConditionalGeneration

    trained = MllamaForConditionalGeneration.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    base = MllamaForConditionalGeneration.from_pretrained(str(tiny_checkpoint), dtype=torch.float32)
    changed = {n for n, p in trained.named_parameters() if not torch.equal(p, base.get_parameter(n))}
    assert changed and not any(n.startswith("model.vision_model") or "projector" in n for n in changed)


def test_the_command_reports_bad_lines_and_refuses_bad_options(tiny_checkpoint, tmp_path, capsys):
    data = _data(tmp_path, [DATA[0], "{oops", _chat("no answer", ""), DATA[1]])
    out = tmp_path / "cli"
    code = main(["finetune", str(tiny_checkpoint), str(data), "--output", str(out), "--max-steps", "1",
                 "--lora-rank", "4"])
    err = capsys.readouterr().err
    assert code == 0 and "line 2: not JSON" in err and "line 3: no assistant answer" in err and "(skipped)" in err
    assert (out / "adapter_config.json").exists() and "step 1/1" in err
    assert main(["finetune", str(tiny_checkpoint), str(data), "--output", str(out), "--strict"]) == 1
    assert "line 2: not JSON" in capsys.readouterr().err
    for flags, words in [(["--freeze", "vision"], "--freeze goes with --full"),
                         (["--full", "--freeze", "encoder"], "--freeze takes"),
                         (["--batch-size", "0"], "--batch-size must be at least 1"),
                         (["--resume", "--output", str(tmp_path / "empty")], "no checkpoint in"),
                         (["--lora-targets", "nothing_like_this"], "--lora-targets")]:
        args = ["finetune", str(tiny_checkpoint), str(data), "--output", str(out), *flags]
        assert main(args) == 1, flags
        assert words in capsys.readouterr().err, flags
    with pytest.raises(FinetuneError, match="--merge is for LoRA"):
        train(_options(tiny_checkpoint, tmp_path, full=True, merge=True))


def test_two_ranks_under_torchrun_follow_the_single_process_run(tiny_checkpoint, tmp_path):
    """Data parallel on the CPU (gloo): 2 ranks with batch size 1 give the loss curve and the adapter of one
    process with batch size 2 (the same global batch)."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    single = train(_options(tiny_checkpoint, tmp_path / "one", max_steps=4))
    data = _data(tmp_path / "two", DATA)
    out = tmp_path / "two" / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "mllama", "finetune", str(tiny_checkpoint), str(data), "--output", str(out), "--max-steps", "4",
               "--batch-size", "1", "--lora-rank", "8", "--lora-alpha", "16", "--lr", "2e-2",
               "--no-gradient-checkpointing"]
    run = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads((out / "history.json").read_text())
    assert [s for s, _ in two["train"]] == [1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor([v for _, v in two["train"]]),
                               torch.tensor([v for _, v in single["history"]["train"]]), rtol=1e-5, atol=1e-6)
    a = load_file(tmp_path / "one" / "out" / "adapter_model.safetensors")
    b = load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:  # Adam's steps (up to lr = 0.02 each) amplify the sums' rounding where a gradient is near 0:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-3)  # 1e-4 at most was seen
    assert run.stderr.count("step 4/4") == 1  # rank 0 speaks for both
