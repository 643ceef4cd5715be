"""OpenAI tool calling with Llama 3.2-Vision's own format.

- The instruct template renders the tool definitions (in the first user message, as Meta's template does) and,
  in the history, an assistant's call as `{"name": ..., "parameters": {...}}` and a tool's result as an
  `ipython` turn. `tools_of` checks the request's `tools`, `tool_choice` and `parallel_tool_calls`;
  `template_messages` turns OpenAI's assistant `tool_calls` (arguments as a JSON string) and `tool` messages
  into what the template takes.
- Text that reaches the template outside the marked user texts (tool names, descriptions, schemas, arguments)
  must not carry special-token text: it would become those tokens. It is refused, naming the field.
- The answer: with tools and `tool_choice` "auto", an answer that is one JSON object `{"name": <a tool>,
  "parameters" (or "arguments"): {...}}` (after an optional `<|python_tag|>`; several separated by ";" when
  parallel calls are allowed) is a call (`calls_of`). With "required" or a named function, the answer is
  decoded under the grammar of such an object (`call_schema`), so it always is one.
- Images: Meta documents that tool calls do not work together with images, so a request with both is refused.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from .prompts import RequestError


@dataclass
class Tools:
    functions: list[dict]  # OpenAI's function objects: name, description, parameters
    choice: str  # "auto", "required", or the name of the function that must be called
    parallel: bool

    @property
    def names(self) -> list[str]:
        return [f["name"] for f in self.functions]


def _strings(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def check_plain(value: Any, specials: list[str], param: str) -> None:
    """Refuses special-token text anywhere in a value the template prints as it is."""
    for text in _strings(value):
        hit = next((s for s in specials if s in text), None)
        if hit is not None:
            raise RequestError(f"{param} contains the special token {hit!r}, which this field cannot carry", param)


def tools_of(body: dict, specials: list[str]) -> Tools | None:
    """The request's tools (None: no tools, or tool_choice "none"); RequestError naming the field at fault."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise RequestError("parallel_tool_calls must be true or false", "parallel_tool_calls")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise RequestError("tool_choice needs tools", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise RequestError("tools must be an array of {\"type\": \"function\", \"function\": {...}}", "tools")
    functions = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RequestError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                               f"\"parameters\": {{...}}}}}}", f"tools[{i}]")
        if not isinstance(fn.get("parameters", {}), dict):
            raise RequestError(f"tools[{i}].function.parameters must be a JSON schema (an object)",
                               f"tools[{i}].function.parameters")
        check_plain(fn, specials, f"tools[{i}].function")
        functions.append(fn)
    if len(set(f["name"] for f in functions)) != len(functions):
        raise RequestError("tools must have different names", "tools")
    if choice in (None, "auto"):
        choice = "auto"
    elif choice == "none":
        return None
    elif choice == "required":
        pass
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        choice = choice["function"].get("name")
        if choice not in [f["name"] for f in functions]:
            raise RequestError(f"tool_choice names {choice!r}, which is not among the tools", "tool_choice")
    else:
        raise RequestError("tool_choice must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", "
                           "\"function\": {\"name\": ...}}", "tool_choice")
    return Tools(functions, choice, parallel)


def call_schema(tools: Tools) -> dict | None:
    """The JSON schema an answer must follow when a call is required (None for "auto")."""
    if tools.choice == "auto":
        return None

    def one(fn: dict) -> dict:
        return {"type": "object", "properties": {"name": {"const": fn["name"]},
                                                 "parameters": fn.get("parameters") or {"type": "object"}},
                "required": ["name", "parameters"], "additionalProperties": False}
    wanted = [f for f in tools.functions if tools.choice in ("required", f["name"])]
    return one(wanted[0]) if len(wanted) == 1 else {"anyOf": [one(f) for f in wanted]}


def template_messages(messages: list[Any], specials: list[str]) -> list[Any]:
    """OpenAI's assistant tool_calls and tool messages as the template takes them (other messages as they
    are); RequestError naming the message at fault."""
    out = []
    for m, message in enumerate(messages):
        where = f"messages[{m}]"
        if not isinstance(message, dict) or (message.get("role") != "tool" and "tool_calls" not in message):
            out.append(message)
            continue
        if message.get("role") == "tool":
            content = message.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if not isinstance(content, str):
                raise RequestError(f"{where}.content must be the tool's result as a string", f"{where}.content")
            out.append({"role": "tool", "content": content})
            continue
        calls = message.get("tool_calls")
        if message.get("role") != "assistant" or not isinstance(calls, list) or len(calls) != 1:
            raise RequestError(f"{where}.tool_calls: this model takes one call per assistant message (in an "
                               f"assistant message)", f"{where}.tool_calls")
        fn = calls[0].get("function") if isinstance(calls[0], dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RequestError(f"{where}.tool_calls[0].function must have a name and arguments",
                               f"{where}.tool_calls[0].function")
        try:
            arguments = json.loads(fn.get("arguments") or "{}") if isinstance(fn.get("arguments", "{}"), str) \
                else fn["arguments"]
        except json.JSONDecodeError:
            raise RequestError(f"{where}.tool_calls[0].function.arguments must be a JSON object (as a string)",
                               f"{where}.tool_calls[0].function.arguments") from None
        if not isinstance(arguments, dict):
            raise RequestError(f"{where}.tool_calls[0].function.arguments must be a JSON object",
                               f"{where}.tool_calls[0].function.arguments")
        check_plain({"name": fn["name"], "arguments": arguments}, specials, f"{where}.tool_calls[0].function")
        out.append({"role": "assistant", "tool_calls": [{"function": {"name": fn["name"], "arguments": arguments}}]})
    return out


def calls_of(text: str, tools: Tools) -> list[dict] | None:
    """The OpenAI tool_calls an answer makes, or None when it is plain text: one JSON call object, or (parallel
    calls allowed) several separated by ";"."""
    body = text.strip().removeprefix("<|python_tag|>").strip()
    decoder, calls, at = json.JSONDecoder(), [], 0
    while at < len(body):
        try:
            call, at = decoder.raw_decode(body, at)
        except json.JSONDecodeError:
            return None
        arguments = call.get("parameters", call.get("arguments")) if isinstance(call, dict) else None
        if not isinstance(arguments, dict) or call.get("name") not in tools.names:
            return None
        calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                      "function": {"name": call["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}})
        rest = body[at:].lstrip()
        if rest and not (rest.startswith(";") and tools.parallel):
            return None
        at = len(body) - len(rest.removeprefix(";").lstrip()) if rest else len(body)
    return calls or None
