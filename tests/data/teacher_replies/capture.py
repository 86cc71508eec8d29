"""Capture the corpus of real teacher replies that tests/test_parser_corpus.py parses.

Run once (it is not run by the tests), from the repository root, offline:

    REFLECT_TUNE_CACHE=/tmp/rt-cache .venv/bin/python tests/data/teacher_replies/capture.py

The teacher is the bundled SmolLM2-135M-Instruct (`bundled:smollm2-135m-instruct`, converted into
REFLECT_TUNE_CACHE), in float32 on CPU. The requests are the project's own: the prompts of
`load_prompts(PROMPT_SET)` rendered with `render(template, values, tag)`, the tag from
`choose_tag(instruction, input, output)`, the system prompt first, exactly as `reflect.ask` builds
them, for the first RECORDS records of examples/alpaca_small.jsonl, instruction reflection
("ins") and response reflection ("res") of each. Three kinds of replies (modes):

- free: what a server answers. The chat-templated messages with the generation prompt, plain
  greedy `model.generate`, at most MAX_NEW_TOKENS new tokens. finish_reason "stop" when the model
  ended its turn (<|im_end|>), "length" when it was cut. The 135M model mostly ignores the layout.
- prefill: the assistant turn starts with the first start marker and a newline, and generation
  stops at the end marker (`stop_strings=[end marker]`): the layout holds by construction. For
  "ins", when the first block ended on its end marker, the reply goes on with a newline, the
  second start marker and a newline, and generation runs again to the end marker. The stored
  reply is everything after the generation prompt: the prefixes plus the generated text, cut
  right after the end marker when generation stopped on it. finish_reason as above.
- sampled: as prefill, but sampled (temperature SAMPLE_TEMPERATURE, top_p SAMPLE_TOP_P, torch seed
  fixed per request and sample), SAMPLES replies per request: greedy decoding of this model loops,
  sampling shows the other ways a weak teacher breaks (or keeps) the layout: markers with one
  bracket, a placeholder echoed inside the layout, an end marker right after the start marker.

`capture.py [MODE ...]` makes only the given modes (default: all three), e.g. `capture.py sampled`.

Each reply is written to `<mode>-<line>-<kind>[-<sample>].json` beside this script, with the
expected outcome of `parse_blocks` set to what the parser says today and `"reviewed": false`.
The checked-in files were then read by hand, reply by reply: each got a `review` note (what the
reader saw) and `"reviewed": true`; where the reader disagrees with the parser, `expected` holds
the reader's outcome, `parser_says` the parser's, and `parser_disagrees` why (the test makes
those strict xfails). Rerun this script only to build a new corpus, and review it the same way.
Captured with transformers 5.24.0 and torch 2.13.0+cpu (each file records its versions), with the
prompts that are now the `conservative` set (they were the only ones then; the default set is now
`paper`): PROMPT_SET pins that set, so a rerun asks what the corpus was asked.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
DATA = ROOT / "examples" / "alpaca_small.jsonl"
MODEL = "bundled:smollm2-135m-instruct"
RECORDS = 10
MAX_NEW_TOKENS = 160
SAMPLES, SAMPLE_TEMPERATURE, SAMPLE_TOP_P = 3, 0.9, 0.95
PROMPT_SET = "conservative"  # the set the checked-in corpus was recorded with


def main(modes: list[str]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reflect_tune.models import resolve_model
    from reflect_tune.layout import choose_tag, load_prompts, marker, parse_blocks, render

    path = resolve_model(MODEL).path
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = load_prompts(PROMPT_SET)
    lines = DATA.read_text(encoding="utf-8").splitlines()[:RECORDS]

    def generate(text: str, stop: str | None, sample: bool = False) -> tuple[str, str]:
        """Continuation of `text` (already chat-templated), greedy unless `sample`: (new text, finish_reason)."""
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        kw = {"stop_strings": [stop], "tokenizer": tok} if stop else {}
        if sample:
            kw.update(do_sample=True, temperature=SAMPLE_TEMPERATURE, top_p=SAMPLE_TOP_P, top_k=0)
        else:
            kw.update(do_sample=False)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.eos_token_id, **kw)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        ended = bool(new) and new[-1] == tok.eos_token_id
        reply = tok.decode(new, skip_special_tokens=True)
        if stop and stop in reply:
            return reply[: reply.index(stop) + len(stop)], "stop"
        return reply, "stop" if ended else "length"

    for n, line in enumerate(lines, 1):
        rec = json.loads(line)
        instruction, input_, output = rec["instruction"], rec.get("input", ""), rec["output"]
        tag = choose_tag(instruction, input_, output)
        for kind in ("ins", "res"):
            if kind == "ins":  # as reflect.ask builds the request
                template, names = prompts.texts["instruction"], ("NEW INSTRUCTION", "NEW ANSWER")
                values = {"instruction": instruction + ("\n" + input_ if input_ else ""), "output": output}
            else:
                template, names = prompts.texts["response_input" if input_ else "response"], ("BETTER ANSWER",)
                values = {"instruction": instruction, "input": input_, "output": output}
            messages = [{"role": "user", "content": render(template, values, tag)}]
            if prompts.texts["system"].strip():
                messages.insert(0, {"role": "system", "content": prompts.texts["system"]})
            start = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            end = marker("END", tag)
            runs = [(mode, k) for mode in modes for k in (range(1, SAMPLES + 1) if mode == "sampled" else [0])]
            for mode, k in runs:
                t0 = time.time()
                sample = mode == "sampled"
                if sample:
                    torch.manual_seed(1000 * n + 10 * k + (kind == "ins"))
                if mode == "free":
                    reply, finish = generate(start, None)
                else:
                    reply, finish = "", "stop"
                    for i, name in enumerate(names):
                        reply += ("\n" if i else "") + marker(name, tag) + "\n"
                        more, finish = generate(start + reply, end, sample)
                        reply += more
                        if not more.endswith(end):  # cut at max tokens, or the turn ended: a server stops here
                            break
                blocks, problem = parse_blocks(reply, names, tag, prompts.placeholders, finish)
                generation = {"greedy": not sample, "max_new_tokens": MAX_NEW_TOKENS, "dtype": "float32",
                              "transformers": _version("transformers"), "torch": torch.__version__}
                if sample:
                    generation.update(temperature=SAMPLE_TEMPERATURE, top_p=SAMPLE_TOP_P,
                                      seed=1000 * n + 10 * k + (kind == "ins"))
                entry = {
                    "record": {"file": "examples/alpaca_small.jsonl", "line": n, "instruction": instruction,
                               "input": input_, "output": output},
                    "kind": kind, "mode": mode, "tag": tag, "names": list(names), "finish_reason": finish,
                    "model": MODEL, "generation": generation,
                    "reply": reply,
                    "expected": {"blocks": blocks, "problem": problem},
                    "reviewed": False,
                }
                name = HERE / (f"{mode}-{n:02d}-{kind}" + (f"-{k}" if sample else "") + ".json")
                name.write_text(json.dumps(entry, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
                print(f"{name.name}: {finish}, {time.time() - t0:.1f}s, {problem or 'ok'}", file=sys.stderr)


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main(sys.argv[1:] or ["free", "prefill", "sampled"])
