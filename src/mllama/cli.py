"""The `mllama` command: generate, chat, info, download, create-tiny, serve."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping

from . import __version__
from .loading import CliError, add_load_args, as_dtype, load

DEFAULT_MODEL = "meta-llama/Llama-3.2-11B-Vision-Instruct"


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
    for name in ("temperature", "top_p", "top_k", "repetition_penalty", "seed"):
        value = getattr(args, name)
        if value is not None:
            kw[name] = value
    if args.greedy:
        kw["do_sample"] = False
    elif args.sample or args.temperature is not None or args.top_p is not None or args.top_k is not None:
        kw["do_sample"] = True
    return kw


# ---------------------------------------------------------------------------------------------------------------
# Checking the arguments (before the model loads, which takes minutes for a large checkpoint)


def _check_args(args: argparse.Namespace) -> None:
    """The flags of generate and chat; each error names its flag and what would be valid."""
    as_dtype(args.dtype)
    _check_device(args.device)
    for flag in ("prompt", "system"):
        _check_utf8(flag, getattr(args, flag, None))
    if args.threads is not None and args.threads < 1:
        raise CliError(f"--threads {args.threads}: use 1 or more")
    _check_sampling(args)


def _check_device(name: str) -> None:
    from .modeling.base import _resolve_device

    try:
        _resolve_device(name, None)
    except ValueError as e:
        raise CliError(f"--device {name}: {e}") from None


def _check_utf8(flag: str, text: str | None) -> None:
    """Arguments that are not UTF-8 reach sys.argv with their bytes as lone surrogates (PEP 383), which the
    tokenizer cannot encode."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        what = f"byte {code - 0xDC00:#04x}" if 0xDC80 <= code <= 0xDCFF else f"character U+{code:04X}"
        raise CliError(f"--{flag} is not valid UTF-8 (a {what} at character {e.start + 1}): give the text in "
                       f"UTF-8") from None


def _check_sampling(args: argparse.Namespace) -> None:
    """The library's own range rules (SamplingParams.validate), reported under the flag's name."""
    from dataclasses import fields

    from .sampling import SamplingParams

    names = {f.name for f in fields(SamplingParams)}
    try:
        SamplingParams(**{k: v for k, v in _sampling(args).items() if k in names}).validate()
    except ValueError as e:
        field = str(e).split()[0]
        raise CliError(f"--{field.replace('_', '-')}{str(e)[len(field):]}" if field in names else str(e)) from None


# ---------------------------------------------------------------------------------------------------------------
# CPU threads


def cpu_threads(flag: int | None, env: Mapping[str, str], cpus: int, physical: int, online: int,
                load: float) -> int:
    """How many threads torch computes with: `--threads`, else MLLAMA_NUM_THREADS, else OMP_NUM_THREADS, else
    the CPUs this process may use (`cpus`, of the machine's `online`) that the 1-minute load average leaves
    idle, at most the `physical` cores among them and at least 1.

    Why not torch's default of one thread per core: its threads wait for each other at every operation, so a
    core taken by another process stalls them all; on a busy 2-core machine the CLI ran 2-15x slower with the
    default than with one thread. Two hyperthreads of one core share its arithmetic units, so threads beyond
    the physical cores add contention, not speed."""
    if flag is not None:
        return flag
    for name in ("MLLAMA_NUM_THREADS", "OMP_NUM_THREADS"):
        value = env.get(name, "").strip()
        if value:
            return _threads_from_env(name, value)
    busy = load * cpus / max(online, cpus)  # the load average counts the whole machine: our CPUs' share of it
    idle = int(cpus - busy + 0.5)  # a CPU busy at most half of the time counts as idle
    return max(1, min(idle, physical))


def _threads_from_env(name: str, value: str) -> int:
    first = value.split(",")[0].strip()  # OpenMP allows a list, one number per nesting level
    if not first.isdigit() or int(first) < 1:
        raise CliError(f"{name}={value!r} is not a number of threads: set a whole number >= 1, or unset it")
    return int(first)


def _physical_cores(cpu_ids: list[int]) -> int:
    """Cores among these CPUs, hyperthreads of one core counted once (len(cpu_ids) where sysfs does not say)."""
    cores = set()
    for cpu in cpu_ids:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            return len(cpu_ids)
    return len(cores) or len(cpu_ids)


def _use_threads(args: argparse.Namespace) -> None:
    import torch

    online = os.cpu_count() or 1
    cpu_ids = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(online))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    torch.set_num_threads(cpu_threads(args.threads, os.environ, len(cpu_ids), _physical_cores(cpu_ids), online,
                                      load))


# ---------------------------------------------------------------------------------------------------------------
# Generating


def _has_chat_template(processor) -> bool:
    return bool(getattr(processor, "chat_template", None))


def _message(text: str, images: list) -> dict:
    content = [{"type": "image", "image": image} for image in images]
    content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def _stream(model, processor, inputs, shown: list[str]) -> None:
    """Prints the answer as it comes, each piece also appended to `shown`. Ctrl-C raises KeyboardInterrupt
    here; leaving the `with` block first stops the generation thread (see generation.stream)."""
    from .generation import stream

    with contextlib.closing(stream(model, processor.tokenizer, **inputs)) as pieces:
        for piece in pieces:
            shown.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


def _load_images(paths: list[str]) -> list:
    from .processing.image_io import load_image

    return [load_image(p, position=f"--image {i + 1} ({p})") for i, p in enumerate(paths)]


# ---------------------------------------------------------------------------------------------------------------
# Commands


def cmd_generate(args: argparse.Namespace) -> None:
    _check_args(args)
    images = _load_images(args.image)
    _use_threads(args)
    model, processor = load(args.model, args.dtype, args.device, quantize=args.quantize,
                            load_format=args.load_format)
    if _has_chat_template(processor) and not args.raw:
        inputs = processor.apply_chat_template([_message(args.prompt, images)], add_generation_prompt=True,
                                               tokenize=True, return_dict=True, return_tensors="pt")
    else:
        prompt = args.prompt
        if images and "<|image|>" not in prompt:
            prompt = "<|image|>" * len(images) + prompt
        inputs = processor(text=prompt, images=images or None, return_tensors="pt")
    _stream(model, processor, {**dict(inputs.to(model.device)), **_sampling(args)}, [])


CHAT_HELP = "commands: /image PATH (attach to your next message), /reset, /exit"


def cmd_chat(args: argparse.Namespace) -> None:
    _check_args(args)
    _use_threads(args)
    model, processor = load(args.model, args.dtype, args.device, quantize=args.quantize,
                            load_format=args.load_format)
    if not _has_chat_template(processor):
        raise CliError(f"{args.model} has no chat template: use `mllama generate` with a base model")
    chat = Chat(model, processor, args)
    interactive = sys.stdin.isatty()
    if interactive:
        _enable_line_editing()
        print(CHAT_HELP)
    try:
        while (line := _read_line(interactive)) is not None and chat.handle(line):
            pass
    except KeyboardInterrupt:  # at the prompt, or between two lines (an answer handles its own)
        if interactive:
            print()


def _enable_line_editing() -> None:
    """Arrow keys, Ctrl-R and this session's history for input(), where Python has readline."""
    try:
        import readline  # noqa: F401  (importing it is what turns line editing on)
    except ImportError:
        pass


def _read_line(interactive: bool) -> str | None:
    """The next line typed, or None at the end of the input (Ctrl-D)."""
    if not interactive:
        line = sys.stdin.readline()
        return line.rstrip("\n") if line else None
    try:
        return input("> ")
    except EOFError:
        print()
        return None


class Chat:
    """A conversation: its messages so far and the images attached to the next message."""

    def __init__(self, model, processor, args: argparse.Namespace):
        self.model, self.processor, self.args = model, processor, args
        self.system = [{"role": "system", "content": args.system}] if args.system else []
        self.messages: list[dict] = list(self.system)
        self.pending: list = []

    def handle(self, line: str) -> bool:
        """Runs one line (a command or a message); False when it asks to leave."""
        command = line.strip()
        if command in ("/exit", "/quit"):
            return False
        if command == "/reset":
            self.messages, self.pending = list(self.system), []
            print("(conversation cleared)")
        elif command.startswith("/image"):
            self.attach(command[len("/image"):].strip())
        elif command.startswith("/"):
            print(f"unknown command {command.split()[0]}; {CHAT_HELP}", file=sys.stderr)
        elif command:
            self.answer(line)
        return True

    def attach(self, path: str) -> None:
        if not path:
            print("usage: /image PATH", file=sys.stderr)
            return
        try:
            self.pending += _load_images([path])
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return
        print(f"(image attached: {path})")

    def answer(self, text: str) -> None:
        """Streams the reply; Ctrl-C stops it, and what was shown of it stays in the conversation."""
        turn = self.messages + [_message(text, self.pending)]
        shown: list[str] = []
        try:
            inputs = self._template(turn)
            if inputs is None:
                return
            _stream(self.model, self.processor, {**dict(inputs.to(self.model.device)), **_sampling(self.args)},
                    shown)
        except KeyboardInterrupt:
            print("\n(answer stopped)")
        self.messages = turn + [{"role": "assistant", "content": "".join(shown)}]
        self.pending = []

    def _template(self, turn: list[dict]):
        """The model's inputs, or None when the template refuses the conversation (the error is shown, and the
        pending images are dropped: kept, they would make every later message fail the same way)."""
        from jinja2 import TemplateError

        try:
            return self.processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=True,
                                                      return_dict=True, return_tensors="pt")
        except (ValueError, TemplateError) as e:  # e.g. the template's rule against a system message with images
            print(f"error: {_one_line(e)}", file=sys.stderr)
            if self.pending:
                print(f"({len(self.pending)} attached image(s) dropped; /image PATH attaches again)", file=sys.stderr)
                self.pending = []
            return None


def _count_parameters(config) -> dict[str, int]:
    import torch

    from .modeling.mllama import MllamaForConditionalGeneration

    with torch.device("meta"):
        model = MllamaForConditionalGeneration(config)
    parts = {"vision": model.model.vision_model, "projector": model.model.multi_modal_projector,
             "text": model.model.language_model, "lm_head": model.lm_head}
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
    counts["total"] = sum(counts.values())
    return counts


def _fp8_bytes(config) -> int:
    """Bytes of the weights with quantize="fp8": e4m3 linear layers of the text model (float32 scales), the rest
    in bf16."""
    import torch

    from .modeling.base import module_names
    from .modeling.mllama import MllamaForConditionalGeneration
    from .quantization import DEFAULT_SCHEME, FP8, use_fp8

    with torch.device("meta"):
        model = MllamaForConditionalGeneration(config)
    use_fp8(model, DEFAULT_SCHEME, lambda name: module_names("MllamaForConditionalGeneration", name))
    return sum(p.numel() * (1 if p.dtype == FP8 else 4 if name.endswith("weight_scale") else 2)
               for name, p in model.named_parameters())


def cmd_info(args: argparse.Namespace) -> None:
    from .config import PRESETS, MllamaConfig
    from .weights import resolve_file

    if args.model in PRESETS:
        config = PRESETS[args.model]()
    else:
        config = MllamaConfig.from_json_file(resolve_file(args.model, "config.json"))
    text, vision = config.text_config, config.vision_config
    counts = _count_parameters(config)
    gib = 2**30
    self_layers = text.num_hidden_layers - len(text.cross_attention_layers)
    kv_per_token = 2 * self_layers * text.num_key_value_heads * text.head_dim * 2
    cross_per_image = (2 * len(text.cross_attention_layers) * text.num_key_value_heads * text.head_dim * 2
                       * vision.max_num_tiles * vision.num_patches)
    info = {
        "model": args.model,
        "text": {"hidden_size": text.hidden_size, "layers": text.num_hidden_layers,
                 "cross_attention_layers": text.cross_attention_layers, "heads": text.num_attention_heads,
                 "kv_heads": text.num_key_value_heads, "intermediate_size": text.intermediate_size,
                 "vocab_size": text.vocab_size, "context": text.max_position_embeddings,
                 "rope": text.rope_parameters},
        "vision": {"tile": vision.image_size, "patch": vision.patch_size, "max_tiles": vision.max_num_tiles,
                   "tokens_per_tile": vision.num_patches, "hidden_size": vision.hidden_size,
                   "layers": f"{vision.num_hidden_layers} local + {vision.num_global_layers} global"},
        "parameters": counts,
        "weights_gib": {"bfloat16": counts["total"] * 2 / gib, "float16": counts["total"] * 2 / gib,
                        "float32": counts["total"] * 4 / gib},
        **({"fp8_weights_gib": _fp8_bytes(config) / gib} if args.quantize == "fp8" else {}),
        "cache_bf16": {"self_attention_kib_per_token": kv_per_token / 1024,
                       "cross_attention_mib_per_image": cross_per_image / 2**20},
        "compat": config.compat,
    }
    if args.quantize not in (None, "fp8"):
        raise CliError(f"--quantize {args.quantize!r} is not supported: use fp8")
    if args.gpu_memory is not None:
        weights_gib = info.get("fp8_weights_gib", info["weights_gib"]["bfloat16"])
        info["fits"] = {"gpu_gib": args.gpu_memory, "weights_gib": weights_gib,
                        "left_gib": args.gpu_memory - weights_gib, "fits": weights_gib < args.gpu_memory}
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"{args.model}")
    print(f"  text:   {text.hidden_size} wide, {text.num_hidden_layers} layers ({self_layers} self-attention + "
          f"{len(text.cross_attention_layers)} cross-attention at {text.cross_attention_layers}), "
          f"{text.num_attention_heads} heads / {text.num_key_value_heads} kv heads, context "
          f"{text.max_position_embeddings}, rope {text.rope_parameters.get('rope_type')}")
    print(f"  vision: {vision.image_size}px tiles of {vision.patch_size}px patches, up to {vision.max_num_tiles} tiles, "
          f"{vision.num_patches} tokens per tile, {vision.hidden_size} wide, {info['vision']['layers']} layers")
    print("  parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    print("  weights: " + ", ".join(f"{k} {v:.1f} GiB" for k, v in info["weights_gib"].items()))
    print(f"  cache (bf16): {kv_per_token / 1024:.0f} KiB per text token, {cross_per_image / 2**20:.1f} MiB per image")
    if "fp8_weights_gib" in info:
        print(f"  weights with --quantize fp8: {info['fp8_weights_gib']:.1f} GiB (text linear layers in e4m3; the "
              f"vision tower, projector and lm_head in bf16)")
    if "fits" in info:
        fits = info["fits"]
        print(f"  on a GPU of {fits['gpu_gib']:g} GiB: " + (
            f"fits, {fits['left_gib']:.1f} GiB left for the cache and activations" if fits["fits"] else
            f"does not fit: the weights alone need {-fits['left_gib']:.1f} GiB more"))


def cmd_download(args: argparse.Namespace) -> None:
    from .weights import resolve_folder

    folder = resolve_folder(args.model, revision=args.revision)
    print(folder)


TINY_PREPROCESSOR = {
    "image_processor_type": "MllamaImageProcessor", "do_convert_rgb": True, "do_resize": True, "do_rescale": True,
    "do_normalize": True, "do_pad": True, "max_image_tiles": 4, "resample": 2,
    "rescale_factor": 1 / 255, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}


def _find_tokenizer_model(explicit: str | None) -> Path:
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise CliError(f"--tokenizer {explicit}: no such file")
        return path
    try:
        import importlib.util

        spec = importlib.util.find_spec("llama_models")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(list(spec.submodule_search_locations)[0]) / "llama3" / "tokenizer.model"
        if candidate.is_file():
            return candidate
    raise CliError("create-tiny needs Meta's Llama 3 tokenizer.model: pass --tokenizer PATH, or "
                   "`pip install --no-deps llama-models`, which ships it")


def create_tiny(folder: str | os.PathLike, tokenizer_model: str | os.PathLike, seed: int = 0,
                tile: int = 56) -> Path:
    """A small random Mllama checkpoint with the real tokenizer and the instruct chat template. `tokenizer_model`:
    Meta's tokenizer.model, or a folder of converted tokenizer files (what convert_tiktoken writes) to copy."""
    import torch

    from .config import MllamaConfig
    from .modeling.mllama import MllamaForConditionalGeneration
    from .processing.convert_tiktoken import convert

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = MllamaConfig(
        vision_config=dict(image_size=tile, patch_size=14, hidden_size=32, attention_heads=2, intermediate_size=64,
                           num_hidden_layers=4, num_global_layers=2, intermediate_layers_indices=[1, 3],
                           vision_output_dim=96),
        text_config=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                         num_hidden_layers=5, cross_attention_layers=[2], max_position_embeddings=4096,
                         eos_token_id=[128001, 128008, 128009],
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
        torch_dtype="float32")
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration.from_config(config)
    with torch.no_grad():  # non-zero gates, so that images change the output
        for name, p in model.named_parameters():
            if "gate" in name.rsplit(".", 1)[-1]:
                p.fill_(0.5)
    model.generation_config.update(bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
                                   pad_token_id=128004, do_sample=False)
    model.save_pretrained(folder)
    if Path(tokenizer_model).is_dir():  # tokenizer files already converted (tokenizer.json and the rest)
        for item in Path(tokenizer_model).iterdir():
            if item.is_file() and item.name not in ("config.json", "generation_config.json", "model.safetensors"):
                shutil.copy(item, folder / item.name)
    else:
        convert(tokenizer_model, folder, instruct=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {**TINY_PREPROCESSOR, "size": {"height": tile, "width": tile}}, indent=2) + "\n")
    return folder


def cmd_create_tiny(args: argparse.Namespace) -> None:
    folder = create_tiny(args.dir, _find_tokenizer_model(args.tokenizer), seed=args.seed)
    print(f"wrote a tiny random checkpoint to {folder}; try: mllama generate --model {folder} --prompt 'Hello'")


# ---------------------------------------------------------------------------------------------------------------
# Argument parsing


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"Hub id or local folder (default {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's), bfloat16, float16 or float32")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add_load_args(p)
    p.add_argument("--threads", type=int, help="CPU threads (default: MLLAMA_NUM_THREADS, OMP_NUM_THREADS, else "
                   "the idle physical cores)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="greedy decoding")
    mode.add_argument("--sample", action="store_true", help="sample (default: the checkpoint's generation config)")


def _add_finetune_args(p: argparse.ArgumentParser) -> None:
    from .finetune.train import LORA_TARGETS
    from .training import PARTS

    p.add_argument("model", help="a checkpoint folder or Hub id")
    p.add_argument("data", help="JSONL: one {\"messages\": [...]} conversation per line (OpenAI's format)")
    p.add_argument("--output", required=True, help="folder for checkpoints, the adapter (or model) and the loss curve")
    p.add_argument("--eval-data", help="JSONL for the eval loss (default: --eval-fraction of DATA)")
    p.add_argument("--eval-fraction", type=float, default=0.0)
    p.add_argument("--full", action="store_true", help="train all weights (default: LoRA adapters)")
    p.add_argument("--freeze", default="", help=f"with --full, parts that stay frozen: comma-separated, of "
                                                f"{', '.join(PARTS)}")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lora-targets", default=",".join(LORA_TARGETS))
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: --epochs over the data)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--max-length", type=int, default=2048, help="longer conversations are bad lines")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--save-every", type=int, default=0, help="a checkpoint every N optimizer steps")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--merge", action="store_true", help="write the model with the adapter merged, not the adapter")
    p.add_argument("--strict", action="store_true", help="a bad line stops the run (default: reported, skipped)")
    p.add_argument("--allow-image-urls", action="store_true", help="fetch http(s) image URLs in the data")
    p.add_argument("--log-every", type=int, default=1)


def cmd_finetune(args: argparse.Namespace) -> None:
    from .finetune.train import FinetuneError, Options, train

    def names(text: str) -> tuple[str, ...]:
        return tuple(n.strip() for n in text.split(",") if n.strip())

    options = Options(model=args.model, data=args.data, output=args.output, eval_data=args.eval_data,
                      eval_fraction=args.eval_fraction, full=args.full, freeze=names(args.freeze),
                      lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      lora_targets=names(args.lora_targets), lr=args.lr, weight_decay=args.weight_decay,
                      warmup_steps=args.warmup_steps, epochs=args.epochs, max_steps=args.max_steps,
                      batch_size=args.batch_size, grad_accum=args.grad_accum, max_length=args.max_length,
                      dtype=args.dtype, device=args.device, gradient_checkpointing=not args.no_gradient_checkpointing,
                      save_every=args.save_every, resume=args.resume, seed=args.seed, merge=args.merge,
                      strict=args.strict, allow_image_urls=args.allow_image_urls, log_every=args.log_every)
    try:
        train(options)
    except FinetuneError as e:
        raise CliError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mllama", description="Llama 3.2-Vision in plain PyTorch")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate text for a prompt and images, streamed to the terminal")
    _add_model_args(p)
    p.add_argument("--image", action="append", default=[], help="image path or URL (repeatable)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--raw", action="store_true", help="no chat template: the prompt is given to the model as is")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat with the instruct template")
    _add_model_args(p)
    p.add_argument("--system", help="system message (text-only conversations; the template forbids it with images)")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="config summary, parameter counts, memory per dtype")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="Hub id, folder, or a preset: 11b, 11b-instruct, "
                   "90b, 90b-instruct")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quantize", help="fp8: also the weights' size with --quantize fp8")
    p.add_argument("--gpu-memory", type=float, metavar="GIB",
                   help="say whether the weights (FP8 ones with --quantize fp8) fit a GPU of this many GiB")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("download", help="download a checkpoint from the Hub (HF_TOKEN for gated repos)")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--revision")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("create-tiny", help="write a small random checkpoint with the real tokenizer, for offline use")
    p.add_argument("dir")
    p.add_argument("--tokenizer", help="Meta's tokenizer.model (default: the one in the llama-models package)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_create_tiny)

    p = sub.add_parser("finetune", help="LoRA (or --full) fine-tuning on JSONL chat conversations")
    _add_finetune_args(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    try:
        from .server import add_arguments as add_serve_arguments, run as run_serve
    except ImportError as e:  # fastapi/uvicorn are the [serve] extra
        missing = str(e)

        def run_serve(args):
            raise CliError(f"`mllama serve` needs the server extra ({missing}): pip install 'mllama[serve]'")
        p.add_argument("model", nargs="?")
        p.add_argument("rest", nargs=argparse.REMAINDER)
    else:
        add_serve_arguments(p)
    p.set_defaults(func=run_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except Exception as e:  # every failure ends as one line; MLLAMA_DEBUG=1 shows the traceback
        if os.environ.get("MLLAMA_DEBUG"):
            raise
        print(f"mllama: error: {_one_line(e)}", file=sys.stderr)
        return 1
    return 0


def _one_line(e: BaseException) -> str:
    import torch

    oom = isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e)))
    if oom:
        return ("out of memory while loading or running the model: try --dtype bfloat16, a smaller model, or "
                "another --device")
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, FileNotFoundError) and e.filename:
        text = f"no such file: {e.filename}"
    return text


if __name__ == "__main__":
    sys.exit(main())
