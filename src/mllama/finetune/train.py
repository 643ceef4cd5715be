"""`mllama finetune MODEL DATA --output DIR`: LoRA (peft) or full fine-tuning on one device.

- Data: finetune.data (JSONL chat conversations; bad lines reported by number and skipped, or fatal with
  `strict`); an eval split from `eval_data` or the last `eval_fraction` of a seeded shuffle.
- Optimisation: AdamW over the trainable parameters, linear warm-up then a cosine decay to 0 over the run's
  optimizer steps, gradient accumulation, gradient checkpointing (on by default), bf16 weights on CUDA.
- Order: each epoch's samples in a permutation seeded by (seed, epoch), so a run is a function of its options.
- Checkpoints every `save_every` steps (DIR/checkpoint-STEP: the trainable weights, the optimizer, the schedule,
  the RNG states and the loss history); `resume` continues from the newest and ends at the same weights as an
  uninterrupted run.
- At the end: DIR/loss_curve.png (train and eval), DIR/history.json, and the adapter (peft's format) or, with
  `merge` or `full`, a plain checkpoint in the published layout with the processor's files.
- Under torchrun: data parallel. Each rank holds the whole model and takes its share of every micro-batch of
  batch_size x ranks samples; the gradients are summed across ranks (gloo on the CPU, NCCL on GPUs). The loss
  of an optimizer step is its label tokens' mean over all its micro-batches and ranks, so a run on N ranks
  follows the single-process run with N times the batch size. Rank 0 logs, evaluates and writes.
"""
from __future__ import annotations

import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..training import IGNORE_INDEX, PARTS, set_trainable
from .data import collate, read_examples

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class FinetuneError(ValueError):
    """A problem with the options or the data, said in one line."""


@dataclass
class Ranks:
    """This process's place in a torchrun launch (rank 0 of 1 without one)."""
    rank: int = 0
    world: int = 1

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t


def _ranks() -> Ranks:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Ranks(dist.get_rank(), world)


@dataclass
class Options:
    model: str
    data: str
    output: str
    eval_data: str | None = None
    eval_fraction: float = 0.0
    full: bool = False  # all weights (but the parts in `freeze`); else LoRA adapters
    freeze: tuple[str, ...] = ()  # with full: parts that stay frozen (training.PARTS)
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 1
    grad_accum: int = 1
    max_length: int = 2048
    dtype: str | None = None  # default: bfloat16 on CUDA, float32 elsewhere
    device: str | None = None
    gradient_checkpointing: bool = True
    save_every: int = 0
    resume: bool = False
    seed: int = 0
    merge: bool = False
    strict: bool = False  # a bad line stops the run (else it is reported and skipped)
    allow_image_urls: bool = False
    log_every: int = 1
    log: object = field(default=None, repr=False)  # where progress goes (None: sys.stderr at the time)


def check(options: Options) -> None:
    """Refuses, naming it, an option that cannot work (before anything is loaded)."""
    positive = {"lora_rank": options.lora_rank, "epochs": options.epochs, "batch_size": options.batch_size,
                "grad_accum": options.grad_accum, "max_length": options.max_length, "log_every": options.log_every}
    for name, value in positive.items():
        if value < 1:
            raise FinetuneError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if options.max_steps is not None and options.max_steps < 1:
        raise FinetuneError(f"--max-steps must be at least 1, got {options.max_steps}")
    if not options.lr > 0 or options.weight_decay < 0 or options.warmup_steps < 0 or options.save_every < 0:
        raise FinetuneError("--lr must be > 0 and --weight-decay, --warmup-steps and --save-every >= 0")
    if not 0 <= options.eval_fraction < 1:
        raise FinetuneError(f"--eval-fraction must be in [0, 1), got {options.eval_fraction}")
    if not 0 <= options.lora_dropout < 1:
        raise FinetuneError(f"--lora-dropout must be in [0, 1), got {options.lora_dropout}")
    unknown = sorted(set(options.freeze) - set(PARTS))
    if unknown:
        raise FinetuneError(f"--freeze takes {', '.join(PARTS)}; got {', '.join(unknown)}")
    if options.freeze and not options.full:
        raise FinetuneError("--freeze goes with --full (LoRA trains only its adapters already)")
    if options.merge and options.full:
        raise FinetuneError("--merge is for LoRA: --full writes the whole model already")


def _log(options: Options, text: str) -> None:
    print(text, file=options.log or sys.stderr, flush=True)


def _load(options: Options):
    from .. import MllamaForConditionalGeneration
    from ..processing.processor import AutoProcessor

    device = options.device or (f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, options.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    model = MllamaForConditionalGeneration.from_pretrained(options.model, dtype=dtype, device_map=device)
    return model, AutoProcessor.from_pretrained(options.model), torch.device(device)


def _examples(options: Options, processor):
    good, bad = read_examples(options.data, processor, max_length=options.max_length,
                              allow_urls=options.allow_image_urls)
    for b in bad:
        _log(options, f"{options.data}: {b}" + ("" if options.strict else " (skipped)"))
    if bad and options.strict:
        raise FinetuneError(f"{options.data}: {bad[0]} ({len(bad)} bad lines; without --strict they are skipped)")
    if options.eval_data:
        evals, bad_eval = read_examples(options.eval_data, processor, max_length=options.max_length,
                                        allow_urls=options.allow_image_urls)
        for b in bad_eval:
            _log(options, f"{options.eval_data}: {b} (skipped)")
        return good, evals
    order = torch.randperm(len(good), generator=torch.Generator().manual_seed(options.seed)).tolist()
    held = int(len(good) * options.eval_fraction)
    evals = [good[i] for i in order[len(good) - held:]] if held else []
    train = [good[i] for i in sorted(order[:len(good) - held])]
    if not train:
        raise FinetuneError(f"{options.data}: no example left to train on")
    return train, evals


def _adapt(model, options: Options):
    """The model with what trains: LoRA adapters (peft) or all weights but the frozen parts."""
    if options.full:
        set_trainable(model, **{part: part not in options.freeze for part in PARTS})
    else:
        try:
            import peft
        except ImportError:
            raise FinetuneError("LoRA needs peft: pip install 'mllama[finetune]' (or train all weights with --full)")
        config = peft.LoraConfig(r=options.lora_rank, lora_alpha=options.lora_alpha,
                                 lora_dropout=options.lora_dropout, target_modules=list(options.lora_targets))
        try:
            model = peft.get_peft_model(model, config)
        except ValueError as e:
            raise FinetuneError(f"--lora-targets: {e}") from None
    if options.gradient_checkpointing:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.gradient_checkpointing_enable()
        base.enable_input_require_grads()  # frozen embeddings: the checkpointed layers' inputs still need grads
    return model.train()


def _schedule(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _micro_batches(train: list, options: Options, epoch: int, ranks: Ranks) -> list[list]:
    """This rank's share of each micro-batch of an epoch (batch_size x ranks samples of a seeded permutation;
    the last ones may leave a rank nothing)."""
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(options.seed * 1000 + epoch)).tolist()
    size = options.batch_size * ranks.world
    return [[train[i] for i in order[k:k + size][ranks.rank::ranks.world]] for k in range(0, len(order), size)]


def _optimizer_step(model, group: list[list], processor, device, dtype, params: dict, ranks: Ranks) -> float:
    """The gradients of one optimizer step's micro-batches (summed over ranks); returns its loss: the mean over
    every label token of the step, on every rank."""
    batches = [_to(collate(micro, processor), device, dtype) for micro in group if micro]
    tokens = torch.tensor(float(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)))
    total = max(1.0, float(ranks.all_sum(tokens)))
    loss_sum = torch.zeros(())
    for batch in batches:
        loss = model(**batch, num_items_in_batch=total).loss
        loss.backward()
        loss_sum += loss.detach().float().cpu()
    if ranks.world > 1:
        for p in params.values():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            ranks.all_sum(p.grad)
    return float(ranks.all_sum(loss_sum))


def _to(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    out = {}
    for name, value in batch.items():
        value = value.to(device)
        out[name] = value.to(dtype) if value.is_floating_point() else value
    return out


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(folder: Path, model, optimizer, scheduler, step: int, history: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    weights = {name: p.detach().cpu() for name, p in _trainable(model).items()}
    torch.save({"step": step, "weights": weights, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(), "history": history},
               folder / "trainer.pt")


def _latest_checkpoint(output: Path) -> Path | None:
    found = sorted((p for p in output.glob("checkpoint-*") if (p / "trainer.pt").exists()),
                   key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None


def _evaluate(model, evals: list, processor, options: Options, device, dtype) -> float | None:
    if not evals:
        return None
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for k in range(0, len(evals), options.batch_size):
            batch = _to(collate(evals[k:k + options.batch_size], processor), device, dtype)
            total += float(model(**batch).loss) * len(evals[k:k + options.batch_size])
            count += len(evals[k:k + options.batch_size])
    model.train()
    return total / count


def train(options: Options) -> dict:
    """Runs a fine-tuning; returns what it did (steps, losses, where it wrote)."""
    check(options)
    ranks = _ranks()
    if ranks.rank:
        options = replace(options, log=io.StringIO())  # rank 0 speaks for all
    output = Path(options.output)
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(options.seed)  # (the same adapters' start on every rank)
    model, processor, device = _load(options)
    dtype = model.dtype
    train_set, evals = _examples(options, processor)
    model = _adapt(model, options)
    params = _trainable(model)
    optimizer = torch.optim.AdamW(params.values(), lr=options.lr, weight_decay=options.weight_decay)
    per_epoch = math.ceil(math.ceil(len(train_set) / (options.batch_size * ranks.world)) / options.grad_accum)
    total = options.max_steps or per_epoch * options.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, options.warmup_steps, total))
    step, history = 0, {"train": [], "eval": []}
    if options.resume:
        latest = _latest_checkpoint(output)
        if latest is None:
            raise FinetuneError(f"--resume: no checkpoint in {output} (checkpoint-STEP folders, from --save-every)")
        state = torch.load(latest / "trainer.pt", weights_only=False)
        with torch.no_grad():
            for name, value in state["weights"].items():
                params[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        step, history = state["step"], state["history"]
        _log(options, f"resumed from {latest} at step {step}")
    _log(options, f"{len(train_set)} training examples, {len(evals)} for eval; {total} optimizer steps; "
                  f"{sum(p.numel() for p in params.values()):,} trainable parameters")
    started, done_samples, first_step = time.perf_counter(), 0, step
    while step < total:
        epoch, into = divmod(step, per_epoch)
        batches = _micro_batches(train_set, options, epoch, ranks)[into * options.grad_accum:]
        for k in range(0, len(batches), options.grad_accum):
            group = batches[k:k + options.grad_accum]
            loss_sum = _optimizer_step(model, group, processor, device, dtype, params, ranks)
            done_samples += sum(len(micro) for micro in group) * ranks.world
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            history["train"].append([step, loss_sum])
            if step % options.log_every == 0 or step == total:
                elapsed = time.perf_counter() - started
                rate = done_samples / elapsed if elapsed > 0 else 0.0
                left = (total - step) * elapsed / max(1, step - first_step)
                _log(options, f"step {step}/{total}  loss {loss_sum:.4f}  lr {scheduler.get_last_lr()[0]:.2e}  "
                              f"{rate:.2f} samples/s  ETA {left:.0f} s")
            if options.save_every and step % options.save_every == 0 and step < total:
                if not ranks.rank:
                    history["eval"].append([step, _evaluate(model, evals, processor, options, device, dtype)])
                    _save_checkpoint(output / f"checkpoint-{step}", model, optimizer, scheduler, step, history)
                _barrier(ranks)
            if step >= total:
                break
    if not ranks.rank:
        history["eval"].append([step, _evaluate(model, evals, processor, options, device, dtype)])
        history["eval"] = [e for e in history["eval"] if e[1] is not None]
        result = _finish(model, processor, options, output, history)
    _barrier(ranks)
    return result if not ranks.rank else {"steps": step, "history": history, "wrote": None}


def _barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        torch.distributed.barrier()


def _finish(model, processor, options: Options, output: Path, history: dict) -> dict:
    (output / "history.json").write_text(json.dumps(history, indent=1))
    write_loss_curve(history, output / "loss_curve.png")
    if options.full or options.merge:
        plain = model.merge_and_unload() if options.merge else model
        plain.gradient_checkpointing_disable()
        plain.save_pretrained(output)
        processor.save_pretrained(output)
        written = "model"
    else:
        model.save_pretrained(output)  # peft's adapter format: adapter_config.json, adapter_model.safetensors
        written = "adapter"
    _log(options, f"wrote the {written} and loss_curve.png to {output}")
    return {"steps": history["train"][-1][0] if history["train"] else 0, "history": history, "wrote": written}


def write_loss_curve(history: dict, path: Path, size: tuple[int, int] = (800, 480)) -> None:
    """A PNG of the train loss per step (blue) and the eval loss (orange points), drawn with pillow."""
    from PIL import Image, ImageDraw

    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    points = [(s, v) for s, v in history["train"]] + [(s, v) for s, v in history["eval"]]
    if not points:
        image.save(path)
        return
    left, right, top, bottom = 60, width - 20, 20, height - 40
    steps = [s for s, _ in points]
    values = [v for _, v in points]
    low, high = min(values), max(values)
    high = high if high > low else low + 1.0
    first, last = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1

    def xy(s, v):
        return (left + (s - first) / (last - first) * (right - left), bottom - (v - low) / (high - low) * (bottom - top))

    draw.rectangle([left, top, right, bottom], outline="black")
    for value in (low, (low + high) / 2, high):
        draw.text((4, xy(first, value)[1] - 6), f"{value:.3g}", fill="black")
    draw.text((left, bottom + 8), f"step {first}", fill="black")
    draw.text((right - 70, bottom + 8), f"step {last}", fill="black")
    train = [xy(s, v) for s, v in history["train"]]
    if len(train) > 1:
        draw.line(train, fill=(31, 119, 180), width=2)
    for x, y in [xy(s, v) for s, v in history["eval"]]:
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(255, 127, 14))
    draw.text((right - 160, top + 6), "train (line), eval (dots)", fill="black")
    image.save(path)
