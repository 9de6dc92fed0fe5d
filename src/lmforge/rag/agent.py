"""A tool-using agent: the ReAct loop (reason, act, observe) with a step limit, over any `ChatModel`.

Two ways to ask for tools, same loop:
- `mode="react"` (works with any model and endpoint): the system prompt lists the tools and the
  Thought / Action / Action Input / Observation format; generation stops before "Observation:", lmforge runs the
  tool and sends its result as the next user message.
- `mode="tools"`: OpenAI function calling: the request carries `tools`, the reply's `tool_calls` are run and
  answered with `role: tool` messages.

A tool error (bad input, a failing program, a file outside the allowed folder) or a reply that follows neither
format becomes the observation, so the model can correct itself; after `max_steps` model calls the run stops with
`stopped="max_steps"`.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from ..errors import ConfigError, LmforgeError, did_you_mean
from .llm import ChatModel, ToolCall
from .tools import Tool, ToolError

REACT_SYSTEM = """Answer the question as well as you can. You have these tools:
{tools}

Use exactly this format:
Thought: what to do next
Action: the tool to use, one of [{names}]
Action Input: the input for the tool
Then stop. You will be given:
Observation: the tool's result
(Thought, Action, Action Input and Observation can repeat.) When you know the answer:
Thought: I know the answer
Final Answer: the answer"""

_FINAL = re.compile(r"Final Answer\s*:\s*(.*)", re.S | re.I)
_ACTION = re.compile(r"Action\s*:\s*(.*?)\s*\n+\s*Action Input\s*:\s*(.*)", re.S | re.I)
_THOUGHT = re.compile(r"Thought\s*:\s*(.*?)(?=\n\s*(?:Action|Final Answer)\s*:|\Z)", re.S | re.I)


@dataclass
class Step:
    output: str  # what the model said (ReAct text, or the content beside tool calls)
    thought: str = ""
    action: str | None = None  # tool name
    action_input: dict | None = None
    observation: str | None = None  # the tool's result or the error shown to the model
    error: bool = False


@dataclass
class AgentResult:
    answer: str | None
    steps: list[Step]
    stopped: Literal["final", "max_steps"]
    messages: list[dict] = field(default_factory=list)  # the whole conversation, for inspection


def parse_react(text: str) -> tuple[str, str, str]:
    """("final", answer, thought) or ("action", "name\\x00input", thought); raises LmforgeError when the text
    follows neither format. An action written before a final answer wins (the model ran ahead of itself)."""
    thought = (m.group(1).strip() if (m := _THOUGHT.search(text)) else "")
    action, final = _ACTION.search(text), _FINAL.search(text)
    if action and (not final or action.start() < final.start()):
        name = action.group(1).strip().strip("`'\"[]")
        arg = re.split(r"\n\s*(?:Observation|Thought)\s*:", action.group(2), maxsplit=1, flags=re.I)[0].strip()
        return "action", f"{name}\x00{arg}", thought
    if final:
        return "final", final.group(1).strip(), thought
    raise LmforgeError("reply follows neither format: write 'Action:' and 'Action Input:' lines, or "
                       "'Final Answer:'")


def _arguments(tool: Tool, raw: str) -> dict:
    """A ReAct input: a JSON object of arguments, else the text as the tool's main argument."""
    text = raw.strip()
    if text.startswith("```"):
        text = re.sub(r"^```\w*\n?|```$", "", text).strip()
    if text.startswith("{"):
        try:
            args = json.loads(text)
            if isinstance(args, dict) and set(args) <= set(tool.parameters.get("properties", {})):
                return args
        except json.JSONDecodeError:
            pass
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    return {tool.main_arg: text}


class Agent:
    def __init__(self, llm: ChatModel, tools: Sequence[Tool], max_steps: int = 8,
                 mode: Literal["react", "tools"] = "react", system: str | None = None, **params):
        if mode not in ("react", "tools"):
            raise ConfigError(f"agent mode must be react or tools (got '{mode}')")
        if len({t.name for t in tools}) != len(tools):
            raise ConfigError("agent tools need distinct names")
        self.llm, self.tools, self.max_steps, self.mode = llm, {t.name: t for t in tools}, max_steps, mode
        self.system = system
        self.params = {"temperature": 0.0, "max_tokens": 256, **params}
        if mode == "react":
            self.params.setdefault("stop", ["\nObservation:", "Observation:"])

    def _system(self) -> str:
        if self.mode == "tools":
            return self.system or "Answer the question. Call the tools you need; reply with the answer when done."
        tools = "\n".join(f"{t.name}: {t.description}" for t in self.tools.values())
        return (self.system + "\n\n" if self.system else "") + REACT_SYSTEM.format(
            tools=tools, names=", ".join(self.tools))

    def _run_tool(self, name: str, args: dict) -> tuple[str, bool]:
        """(observation, was it an error)."""
        tool = self.tools.get(name)
        if tool is None:
            hint = did_you_mean(name, self.tools)
            return f"error: there is no tool '{name}'{hint}; tools: {', '.join(self.tools)}", True
        try:
            return tool(**args), False
        except ToolError as e:
            return f"error: {e}", True
        except TypeError as e:  # wrong argument names from the model
            return f"error: bad arguments for {name}: {e}", True

    def run(self, question: str) -> AgentResult:
        messages = [{"role": "system", "content": self._system()}, {"role": "user", "content": question}]
        steps: list[Step] = []
        for _ in range(self.max_steps):
            if self.mode == "tools":
                done = self._tools_step(messages, steps)
            else:
                done = self._react_step(messages, steps)
            if done is not None:
                return AgentResult(done, steps, "final", messages)
        return AgentResult(None, steps, "max_steps", messages)

    def _react_step(self, messages: list[dict], steps: list[Step]) -> str | None:
        output = self.llm.chat(messages, **self.params).content
        output = re.split(r"\n?Observation\s*:", output, maxsplit=1)[0].rstrip()  # in case stop was ignored
        messages.append({"role": "assistant", "content": output})
        try:
            kind, value, thought = parse_react(output)
        except LmforgeError as e:
            steps.append(Step(output, observation=f"error: {e}", error=True))
            messages.append({"role": "user", "content": f"Observation: error: {e}"})
            return None
        if kind == "final":
            steps.append(Step(output, thought))
            return value
        name, raw = value.split("\x00", 1)
        args = _arguments(self.tools[name], raw) if name in self.tools else {"input": raw}
        observation, error = self._run_tool(name, args)
        steps.append(Step(output, thought, name, args, observation, error))
        messages.append({"role": "user", "content": f"Observation: {observation}"})
        return None

    def _tools_step(self, messages: list[dict], steps: list[Step]) -> str | None:
        params = {k: v for k, v in self.params.items() if k != "stop"}
        reply = self.llm.chat(messages, tools=[t.openai_schema() for t in self.tools.values()], **params)
        if not reply.tool_calls:
            messages.append({"role": "assistant", "content": reply.content})
            steps.append(Step(reply.content))
            return reply.content.strip()
        calls = [ToolCall(c.name, c.arguments, c.id or f"call_{len(steps)}_{i}") for i, c in enumerate(reply.tool_calls)]
        messages.append({"role": "assistant", "content": reply.content or None, "tool_calls": [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]})
        for c in calls:
            try:
                args = c.parsed_arguments()
                observation, error = self._run_tool(c.name, args)
            except LmforgeError as e:
                args, observation, error = None, f"error: {e}", True
            steps.append(Step(reply.content, "", c.name, args, observation, error))
            messages.append({"role": "tool", "tool_call_id": c.id, "content": observation})
        return None
