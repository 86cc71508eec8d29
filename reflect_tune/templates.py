"""Prompt templates shared by scoring and training, written out exactly so other tools can
reproduce our numbers (issue 4; docs/FORMATS.md §8.2).

Data is inserted with `str.format` on the template only, so braces or placeholder names inside an
instruction are kept verbatim and never substituted a second time.
"""

from __future__ import annotations

from reflect_tune.errors import ReflectTuneError

# The Stanford Alpaca prompt pair.
ALPACA_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
# FastChat's vicuna v1.1 system prompt.
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# r-IFD's "guess the instruction" wording; `{answer}` is replaced by the answer.
REVERSE_DEFAULT = (
    "Below is the response to an instruction, please guess the corresponding instruction for the given response.\n"
    "{answer}\nGenerate the instruction for the above response."
)


def alpaca_prompt(instruction: str, input: str = "", preamble: str | None = None) -> str:
    """The Alpaca prompt with the answer left empty; it ends with "### Response:"."""
    if input:
        return "{p}\n\n### Instruction:\n{i}\n\n### Input:\n{x}\n\n### Response:".format(
            p=preamble or ALPACA_PREAMBLE_INPUT, i=instruction, x=input)
    return "{p}\n\n### Instruction:\n{i}\n\n### Response:".format(p=preamble or ALPACA_PREAMBLE, i=instruction)


def join_input(instruction: str, input: str = "", join: str = "newline") -> str:
    """An instruction and its input as one text: "newline" puts the input on the next line; "labelled"
    (the released SRT code's vicuna prompt) writes "Input:" on a line of its own between them."""
    if not input:
        return instruction
    return f"{instruction}\nInput:\n{input}" if join == "labelled" else f"{instruction}\n{input}"


def template_prompt(template: str, instruction: str, input: str = "", input_join: str = "newline") -> str:
    """The prompt of a text template with the answer left empty (the answer is appended directly).

    `input_join` applies to vicuna and none (alpaca gives the input its own section)."""
    text = join_input(instruction, input, input_join)
    if template == "alpaca":
        return alpaca_prompt(instruction, input)
    if template == "vicuna":
        return f"{VICUNA_SYSTEM} USER: {text} ASSISTANT:"
    if template == "none":
        return f"{text}\n"
    raise ReflectTuneError(f"unknown template {template!r}; choose chat, alpaca, vicuna or none")


def reverse_text(reverse: str, answer: str) -> str:
    """REVERSE(answer): the wording with its one `{answer}` placeholder filled (once, not rescanned)."""
    head, sep, tail = reverse.partition("{answer}")
    return head + answer + tail if sep else reverse
