"""Stage 1, `reflect-tune reflect`: a teacher LLM rewrites every instruction pair.

Per input record, three teacher calls (the variants the paper's selection compares):

- `ins`: instruction reflection of the original pair (x0, y0) gives a new pair (x_ins, y_ins);
- `res`: response reflection of the original pair gives a better answer y_res;
- `res_ins`: response reflection of (x_ins, y_ins) gives y_res_ins. It waits for `ins`.

The prompts are files (`reflect_tune/prompts/`, overridable with `--prompts DIR`). The teacher
writes its text between markers; each request gets its own marker tag (`[[BETTER ANSWER 3fa9c1d2]]`)
that does not occur in the record, so data containing marker strings cannot steer the parser.
A reply that cannot be used (no markers, empty text, "N/A", a placeholder echo) is re-asked once,
then recorded as `parse_failed` with the reason; consumers fall back to the original.

The loop: workers take records in order; each record's requests go through `TeacherClient`
(cache, limits, retries). The output JSONL is written at the end, in input order, atomically;
finished work lives in the request cache from the moment it arrives, so a killed run resumes
by running the same command again. Format: docs/FORMATS.md §8.1.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from reflect_tune.artifacts import check_output_file
from reflect_tune.config import ReflectConfig, SettingError
from reflect_tune.errors import ReflectTuneError, looks_like_secret, register_secret
from reflect_tune.cache import CacheFull, RequestCache
from reflect_tune.teacher import REJECTED, ApiFailed, FatalApiError, Pending, Stopped, TeacherClient, rough_tokens

log = logging.getLogger("reflect_tune.reflect")

STAGES = ("instruction", "response")
VARIANTS = ("ins", "res", "res_ins")
START_MARKERS = ("NEW INSTRUCTION", "NEW ANSWER", "BETTER ANSWER")
PROMPT_FILES = {
    "system": ("system.txt", (), ()),
    "instruction": ("instruction.txt", ("instruction", "output"), ("NEW INSTRUCTION", "NEW ANSWER", "END")),
    "response": ("response.txt", ("instruction", "output"), ("BETTER ANSWER", "END")),
    "response_input": ("response_input.txt", ("instruction", "input", "output"), ("BETTER ANSWER", "END")),
    "reask": ("reask.txt", ("problem", "layout"), ()),
}
# The marker format, owned here (the test server asks this module for it): `[[NAME]]` in a prompt
# file, `[[NAME TAG]]` in a request and its reply, TAG being 8 hex characters chosen per request.
MARKER = re.compile(r"\[\[(NEW INSTRUCTION|NEW ANSWER|BETTER ANSWER|END)(?: ([0-9a-f]{6,16}))?\]\]")


def marker(name: str, tag: str = "") -> str:
    """`[[NAME TAG]]`, or `[[NAME]]` without a tag (as written in the prompt files)."""
    return f"[[{name} {tag}]]" if tag else f"[[{name}]]"


def block(name: str, text: str, tag: str = "") -> str:
    """One block of a reply: the start marker, the text, the end marker, on their own lines."""
    return f"{marker(name, tag)}\n{text}\n{marker('END', tag)}"


_TOKEN = re.compile(r"\{(instruction|input|output|problem|layout)\}|\[\[(NEW INSTRUCTION|NEW ANSWER|BETTER ANSWER|END)\]\]")
_GENERIC_PLACEHOLDERS = {
    "your instruction", "your new instruction", "your answer", "your new answer", "your better answer",
    "your improved text here", "your improved instruction", "your improved answer", "new instruction",
    "new answer", "better answer", "the new instruction", "the new answer", "the better answer",
    "insert instruction here", "insert answer here", "your text here",
}
_NA = {"n a", "na", "none", "not applicable", "n a n a"}

# USD per 1M tokens (prompt, completion), standard tier, from OpenAI's pricing page as of
# 2025-08. Prices change: pass --price-in/--price-out to be exact. The Batch API costs half.
PRICES_DATE = "2025-08"
PRICES = {
    "gpt-4.1-nano": (0.10, 0.40), "gpt-4.1-mini": (0.40, 1.60), "gpt-4.1": (2.00, 8.00),
    "gpt-4o-mini": (0.15, 0.60), "gpt-4o": (2.50, 10.00), "gpt-4-turbo": (10.00, 30.00),
    "gpt-3.5-turbo": (0.50, 1.50), "o4-mini": (1.10, 4.40), "o3-mini": (1.10, 4.40), "o3": (2.00, 8.00),
}


# ---------------------------------------------------------------------------------------------
# Prompts: load, validate, render
# ---------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Prompts:
    texts: dict[str, str]
    sources: dict[str, str]
    sha256: dict[str, str]
    placeholders: set[str] = field(default_factory=set)


def _normalize(text: str) -> str:
    return re.sub(r"[\W_]+", " ", text.lower()).strip()


def load_prompts(folder: str | None = None) -> Prompts:
    """The built-in prompts, with any file present in `folder` taking precedence. Validated."""
    builtin = resources.files("reflect_tune") / "prompts"
    if folder is not None and not Path(folder).is_dir():
        raise ReflectTuneError(f"{folder}: --prompts must be a folder holding any of "
                               + ", ".join(f for f, _, _ in PROMPT_FILES.values()))
    texts, sources, digests, placeholders = {}, {}, {}, set(_GENERIC_PLACEHOLDERS)
    for name, (filename, needs, markers) in PROMPT_FILES.items():
        path = Path(folder) / filename if folder else None
        source = path if path is not None and path.is_file() else builtin / filename
        try:
            text = source.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ReflectTuneError(f"{source}: cannot read prompt: {e}") from None
        where = str(source)
        for placeholder in needs:
            if "{" + placeholder + "}" not in text:
                raise ReflectTuneError(f"{where}: prompt lacks the placeholder {{{placeholder}}}")
        for name_ in markers:
            if marker(name_) not in text:
                raise ReflectTuneError(f"{where}: prompt lacks the marker {marker(name_)}")
        for m in re.finditer(r"\[\[(NEW INSTRUCTION|NEW ANSWER|BETTER ANSWER)\]\](.*?)\[\[END\]\]", text, re.S):
            placeholders.add(_normalize(m.group(2)))  # the layout example's filler text
        texts[name], sources[name] = text.strip("\n"), where
        digests[name] = hashlib.sha256(text.encode("utf-8")).hexdigest()
    placeholders.discard("")
    return Prompts(texts=texts, sources=sources, sha256=digests, placeholders=placeholders)


def render(template: str, values: dict[str, str], tag: str) -> str:
    """Fill placeholders and tag markers in one pass over the template; values are never rescanned."""

    def fill(m: re.Match) -> str:
        if m.group(1):
            return values.get(m.group(1), m.group(0))
        return marker(m.group(2), tag)

    return _TOKEN.sub(fill, template)


def choose_tag(*texts: str) -> str:
    """A marker tag, stable for the same texts (so cache keys are stable), absent from them."""
    seed = json.dumps(texts, ensure_ascii=False)
    for salt in range(1000):
        tag = hashlib.sha256(f"{salt}:{seed}".encode("utf-8")).hexdigest()[:8]
        if not any(tag in t for t in texts):
            return tag
    raise ReflectTuneError("could not choose a marker tag")  # pragma: no cover - needs 1000 collisions


def layout(names: tuple[str, ...], tag: str) -> str:
    return "\n".join(block(n, f"(the {n.lower()})", tag) for n in names)


def parse_blocks(text: str, names: tuple[str, ...], tag: str, placeholders: set[str],
                 finish_reason: str | None = "stop") -> tuple[dict[str, str] | None, str | None]:
    """Take each block's text between its tagged start marker and the next tagged marker.

    The last start marker wins (the teacher's final answer comes after its analysis). A block
    ends at `[[END tag]]` or at the next tagged start marker; a missing end is accepted only when
    the reply ended naturally (not cut at max_tokens). A block that is empty, "N/A", or the layout's
    filler (whole, or as its first line) is a problem. Returns (blocks, None) or (None, problem).
    """
    end, out = marker("END", tag), {}
    for name in names:
        start = marker(name, tag)
        i = text.rfind(start)
        if i < 0:
            return None, f"no {start} marker"
        body_start = i + len(start)
        stops = [j for j in (text.find(m, body_start) for m in [end] + [marker(n, tag) for n in START_MARKERS]) if j >= 0]
        if not stops and finish_reason == "length":
            return None, f"no {end} marker after {start} (the reply hit --max-tokens)"
        body = text[body_start:min(stops)] if stops else text[body_start:]
        body = body.strip()
        norm = _normalize(body)
        if not body:
            return None, f"empty text after {start}"
        if norm in _NA:
            return None, f"N/A after {start}"
        if norm in placeholders or _normalize(body.split("\n", 1)[0]) in placeholders:
            # the whole block, or its first line, is the layout's filler: what follows it was not
            # written as the answer (a small teacher echoes "(the better answer)", then chats on)
            return None, f"placeholder echo after {start}"
        out[name] = body
    return out, None


# ---------------------------------------------------------------------------------------------
# One record
# ---------------------------------------------------------------------------------------------


def _usage() -> dict[str, int]:
    return {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0}


def _variant(status: str, reason: str | None, usage: dict[str, int], **texts: Any) -> dict[str, Any]:
    return {"status": status, "reason": reason, **texts, "usage": usage}


async def ask(client: TeacherClient, prompts: Prompts, kind: str, instruction: str, input: str, output: str,
              reask: bool = True) -> dict:
    """One reflection (with its single re-ask). Returns the variant as written to the output."""
    if kind == "ins":
        template, names = prompts.texts["instruction"], ("NEW INSTRUCTION", "NEW ANSWER")
        values = {"instruction": instruction + ("\n" + input if input else ""), "output": output}
    else:
        template, names = prompts.texts["response_input" if input else "response"], ("BETTER ANSWER",)
        values = {"instruction": instruction, "input": input, "output": output}
    tag = choose_tag(instruction, input, output)
    messages = [{"role": "user", "content": render(template, values, tag)}]
    if prompts.texts["system"].strip():
        messages.insert(0, {"role": "system", "content": prompts.texts["system"]})
    usage = _usage()
    problem = None
    try:
        for attempt in range(2 if reask else 1):
            reply = await client.chat(messages)
            usage["requests"] += 1
            usage["prompt_tokens"] += reply.prompt_tokens
            usage["completion_tokens"] += reply.completion_tokens
            blocks, why = parse_blocks(reply.text, names, tag, prompts.placeholders, reply.finish_reason)
            if blocks is not None:
                if kind == "ins":
                    return _variant("ok", None, usage, instruction=blocks["NEW INSTRUCTION"], input="",
                                    output=blocks["NEW ANSWER"])
                return _variant("ok", None, usage, output=blocks["BETTER ANSWER"])
            problem = why if problem is None else f"{problem}; after re-ask: {why}"
            reask = render(prompts.texts["reask"], {"problem": why, "layout": layout(names, tag)}, tag)
            messages = messages + [{"role": "assistant", "content": reply.text}, {"role": "user", "content": reask}]
    except ApiFailed as e:
        return _variant("api_failed", e.reason, usage, **_no_text(kind))
    except Pending:
        return _variant("pending", "not in the cache yet", usage, **_no_text(kind))
    return _variant("parse_failed", problem, usage, **_no_text(kind))


def _no_text(kind: str) -> dict[str, None]:
    return {"instruction": None, "input": None, "output": None} if kind == "ins" else {"output": None}


async def reflect_record(rec, client: TeacherClient, prompts: Prompts, stages: tuple[str, ...], reask: bool = True) -> dict:
    """All requested variants of one record; `ins` and `res` run concurrently, `res_ins` after `ins`."""
    jobs = {}
    if "instruction" in stages:
        jobs["ins"] = ask(client, prompts, "ins", rec.instruction, rec.input, rec.output, reask)
    if "response" in stages:
        jobs["res"] = ask(client, prompts, "res", rec.instruction, rec.input, rec.output, reask)
    try:
        done = dict(zip(jobs, await asyncio.gather(*jobs.values())))
    except FatalApiError as e:
        if getattr(e, "status", None) == 400:  # about a shared setting, but show where it was met
            raise FatalApiError(f"record {rec.id!r} ({rec.where or 'input'}): {e}") from None
        raise
    variants = {}
    for kind, stage in (("ins", "instruction"), ("res", "response")):
        variants[kind] = done.get(kind) or _variant("skipped", f"stage '{stage}' not requested", _usage(), **_no_text(kind))
    ins = variants["ins"]
    if "response" not in stages or "instruction" not in stages:
        missing = "response" if "response" not in stages else "instruction"
        variants["res_ins"] = _variant("skipped", f"stage '{missing}' not requested", _usage(), output=None)
    elif ins["status"] != "ok":
        status = "pending" if ins["status"] == "pending" else "skipped"
        variants["res_ins"] = _variant(status, "ins not ok", _usage(), output=None)
    else:
        variants["res_ins"] = await ask(client, prompts, "res_ins", ins["instruction"], "", ins["output"], reask)
    total = _usage()
    for v in variants.values():
        for k in total:
            total[k] += v["usage"][k]
    original = {"instruction": rec.instruction, "input": rec.input, "output": rec.output, "system": rec.system}
    return {"id": rec.id, "original": original, "variants": variants, "usage": total}


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def validate(config: ReflectConfig) -> None:
    """Everything that can be checked before the input is read and anything is sent: the settings,
    the output path, the prompt files, and the API key's variable (its name, and that it is set)."""
    bad = [s for s in config.stages if s not in STAGES]
    if bad or not config.stages:
        raise SettingError("stages", f"--stages: expected a comma-separated subset of {','.join(STAGES)}, "
                                     f"got {','.join(config.stages) or 'nothing'}")
    for name in ("concurrency", "max_tokens"):
        if getattr(config, name) < 1:
            raise SettingError(name, f"--{name.replace('_', '-')} must be at least 1")
    for name, value in (("no_wait", config.no_wait), ("retry_failed", config.retry_failed)):
        if value and not config.batch_api:
            raise SettingError(name, f"--{name.replace('_', '-')} only applies with --batch-api")
    check_api_key_env(config.api_key_env)
    api_key(config)
    load_prompts(config.prompts)
    out = Path(config.output)
    if out.suffix != ".jsonl":
        raise ReflectTuneError(f"{out}: the reflect output is JSON Lines; name it *.jsonl")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ReflectTuneError(f"{out}: the folder {parent} does not exist")
    check_output_file(out, [config.input])  # not a folder, not the input, and writable: before any request


def check_api_key_env(name: str) -> None:
    """The variable's NAME is asked for; a key given there by mistake is refused and never shown or stored."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name or "") or looks_like_secret(name):
        register_secret(name)
        raise SettingError("api_key_env", "--api-key-env (api_key_env): expected the NAME of an environment variable, "
                           "e.g. OPENAI_API_KEY; the value given is not a variable name (not shown: it may be the key itself)")


def api_key(config: ReflectConfig) -> str | None:
    """The key from the environment (None for a local server that needs none); registered as a secret."""
    key = os.environ.get(config.api_key_env) or None
    register_secret(key)  # no message or written file may show it
    if key is None and config.base_url is None and not config.dry_run:
        raise ReflectTuneError(f"the environment variable {config.api_key_env} is not set (it holds the OpenAI API key; "
                               "use --api-key-env NAME for another variable, or --base-url for a local server)")
    return key


def _cache_folder(config: ReflectConfig) -> Path:
    if config.cache_dir:
        return Path(config.cache_dir)
    from reflect_tune.models import cache_dir

    return cache_dir() / "reflect"


@dataclass(kw_only=True)
class ReflectResult:
    """What a reflect run did. `status`: done, submitted (Batch API with --no-wait: rerun to collect)
    or planned (--dry-run: `summary` is the plan). `refused`: one line per variant the teacher
    refused (record id, FILE:LINE, variant, reason)."""

    status: str
    summary: dict[str, Any]
    output: str
    refused: list[str] = field(default_factory=list)


def run(config: ReflectConfig) -> ReflectResult:
    """Validate everything, then reflect (live, dry run or Batch API)."""
    from reflect_tune.records import load_records

    validate(config)
    prompts = load_prompts(config.prompts)
    records, report = load_records(config.input, format=config.format, split=config.split, limit=config.limit,
                                   on_duplicate="drop" if config.dedupe else "error")
    if not records:
        raise ReflectTuneError(f"{config.input}: no records to reflect")
    for line in report.warnings():
        log.warning("warning: %s", line)
    key = api_key(config)
    cache = RequestCache(_cache_folder(config))
    started = time.time()
    try:
        if config.dry_run:
            return ReflectResult(status="planned", summary=dry_run(config, records, prompts, cache), output=config.output)
        cache.ensure_reserve()  # room to keep the replies in flight if the disk fills up
        client = TeacherClient(model=config.model, base_url=config.base_url, api_key=key, params=config.params(),
                               cache=cache, concurrency=config.concurrency, rpm=config.rpm, tpm=config.tpm,
                               timeout=config.timeout, max_retries=config.max_retries, backoff=config.backoff)
        if config.tpm is not None:
            _check_tpm(config, records, prompts)
        if config.batch_api:
            from reflect_tune.batch import run_batches

            if config.retry_failed:
                cache.clear_failures()
            client.collect = True
            if not run_batches(config, records, prompts, client, key, walk):
                return ReflectResult(status="submitted", summary={}, output=config.output)
            lines = asyncio.run(walk(records, client, prompts, config, progress=False))
        else:
            lines = asyncio.run(_live(records, client, prompts, config))
        summary = _summary(config, lines, client, time.time() - started)
        _write(config, lines, prompts, report, summary)
        return ReflectResult(status="done", summary=summary, output=config.output, refused=_rejected(records, lines))
    finally:
        cache.close()


def _check_tpm(config: ReflectConfig, records, prompts: Prompts) -> None:
    longest = max(len(r.instruction) + len(r.input) + len(r.output) for r in records)
    widest = max(len(t) for t in prompts.texts.values())
    est = rough_tokens(longest + widest) + config.max_tokens
    if est > config.tpm:
        raise ReflectTuneError(f"--tpm {config.tpm} is below a single request's budget (~{est} tokens: prompt + "
                               f"--max-tokens {config.max_tokens}); raise --tpm or lower --max-tokens")


async def walk(records, client: TeacherClient, prompts: Prompts, config: ReflectConfig, progress: bool = True) -> list[dict]:
    """Reflect every record with `concurrency` workers; stops everything on a fatal API error."""
    results: list[dict | None] = [None] * len(records)
    next_index = iter(range(len(records)))
    bar = _Progress(len(records), client, enabled=progress and config.progress)

    async def worker() -> None:
        for i in next_index:
            results[i] = await reflect_record(records[i], client, prompts, config.stages, config.reask)
            bar.record_done(results[i])

    workers = [asyncio.create_task(worker()) for _ in range(min(config.concurrency, len(records)))]
    client.on_update = bar.refresh
    try:
        done, pending = await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
        errors = [t.exception() for t in done if t.exception() is not None]
        if errors:
            # send nothing more, but let the requests on the wire answer and reach the cache: paid for
            first = next((e for e in errors if not isinstance(e, Stopped)), None)
            client.stop(first or errors[0])
            await client.settle()
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            raise first or client.stop_error
    finally:
        bar.close()
        client.on_update = None
    return results  # type: ignore[return-value]


async def _live(records, client: TeacherClient, prompts: Prompts, config: ReflectConfig) -> list[dict]:
    try:
        return await walk(records, client, prompts, config)
    except FatalApiError as e:
        raise FatalApiError(f"{e} — stopped; {len(client.cache)} replies are cached, rerun the same command to resume") from None
    except CacheFull as e:
        lost = client.save_unsaved()
        raise CacheFull(f"{e}" + (f"; {lost} paid replies could not be saved" if lost else "")) from None
    finally:
        await client.aclose()


def _rejected(records, lines: list[dict]) -> list[str]:
    """'record ID (FILE:LINE) VARIANT: reason' for each variant the teacher refused (HTTP 400 about it)."""
    out = []
    for rec, line in zip(records, lines):
        for kind, v in line["variants"].items():
            if v["status"] == "api_failed" and (v["reason"] or "").startswith(REJECTED):
                out.append(f"record {rec.id!r} ({rec.where or 'input'}) {kind}: {v['reason']}")
    return out


class _Progress:
    """A rich progress bar on stderr: records done/total, requests/s, tokens/s, failures, ETA."""

    def __init__(self, total: int, client: TeacherClient, enabled: bool):
        self.client, self.enabled, self.started = client, enabled, time.monotonic()
        self.failed = 0
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("reflect"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rps]:.1f} req/s  {task.fields[tps]:.0f} tok/s  failed {task.fields[failed]}"),
            TimeRemainingColumn(), console=Console(stderr=True), refresh_per_second=4,
        )
        self.task = self.progress.add_task("reflect", total=total, rps=0.0, tps=0.0, failed=0)
        self.progress.start()

    def record_done(self, line: dict) -> None:
        self.failed += sum(v["status"] in ("api_failed", "parse_failed") for v in line["variants"].values())
        if self.enabled:
            self.progress.advance(self.task)
            self.refresh()

    def refresh(self) -> None:
        if not self.enabled:
            return
        s, dt = self.client.stats, max(time.monotonic() - self.started, 1e-6)
        self.progress.update(self.task, rps=(s.succeeded + s.cached) / dt,
                             tps=(s.prompt_tokens + s.completion_tokens) / dt, failed=self.failed)

    def close(self) -> None:
        if self.enabled:
            self.refresh()
            self.progress.stop()


def price_for(config: ReflectConfig) -> tuple[float | None, float | None, str]:
    """USD per 1M prompt and completion tokens, and where the figures came from."""
    if config.price_in is not None or config.price_out is not None:
        return config.price_in or 0.0, config.price_out or 0.0, "--price-in/--price-out"
    name = config.model.split("/")[-1].lower()
    for prefix in sorted(PRICES, key=len, reverse=True):
        if name.startswith(prefix):
            p_in, p_out = PRICES[prefix]
            if config.batch_api:
                return p_in / 2, p_out / 2, f"built-in table ({PRICES_DATE}, {prefix}, Batch API half price)"
            return p_in, p_out, f"built-in table ({PRICES_DATE}, {prefix})"
    return None, None, "unknown model: pass --price-in/--price-out"


def cost(prompt_tokens: int, completion_tokens: int, config: ReflectConfig) -> float | None:
    p_in, p_out, _ = price_for(config)
    if p_in is None:
        return None
    return (prompt_tokens * p_in + completion_tokens * p_out) / 1e6


def _summary(config: ReflectConfig, lines: list[dict], client: TeacherClient, wall: float) -> dict[str, Any]:
    s = client.stats
    statuses: dict[str, dict[str, int]] = {v: {} for v in VARIANTS}
    for line in lines:
        for kind, v in line["variants"].items():
            statuses[kind][v["status"]] = statuses[kind].get(v["status"], 0) + 1
    _, _, price_source = price_for(config)
    failures = dict(s.failures)
    parse_failed = sum(d.get("parse_failed", 0) for d in statuses.values())
    if parse_failed:
        failures["parse_failed"] = parse_failed
    rejected = sum(1 for line in lines for v in line["variants"].values()
                   if v["status"] == "api_failed" and (v["reason"] or "").startswith(REJECTED))
    return {
        "records": len(lines),
        "requests_sent": s.sent, "requests_answered": s.succeeded, "requests_cached": s.cached,
        "requests_from_other_process": s.waited_for_others, "variants_rejected": rejected,
        "retries": s.retries, "retries_by_kind": dict(s.retry_kinds), "failures_by_kind": failures,
        "variants": statuses,
        "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
        "cached_prompt_tokens": s.cached_prompt_tokens, "cached_completion_tokens": s.cached_completion_tokens,
        "cost_usd": cost(s.prompt_tokens, s.completion_tokens, config), "price_source": price_source,
        "rate_limit_wait_s": round(client.limiter.waited, 3), "wall_s": round(wall, 3),
    }


def _write(config: ReflectConfig, lines: list[dict], prompts: Prompts, report, summary: dict) -> None:
    from reflect_tune.artifacts import atomic_path, provenance, write_meta

    meta = provenance("reflect", config, inputs=[config.input] if Path(config.input).exists() else [])
    meta["prompts"] = {name: {"source": prompts.sources[name], "sha256": prompts.sha256[name]} for name in prompts.texts}
    meta["load_report"] = report.__dict__
    meta["summary"] = summary
    out = Path(config.output)
    try:
        with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            for line in lines:
                fh.write(json.dumps(line, ensure_ascii=False) + "\n")
    except OSError as e:
        raise ReflectTuneError(f"{out}: cannot write: {e.strerror or e}") from None
    write_meta(out, meta)


# ---------------------------------------------------------------------------------------------
# --dry-run: requests, tokens and cost, without sending anything
# ---------------------------------------------------------------------------------------------

_OPENAI_NAME = re.compile(r"^(ft:)?(gpt-|o\d|chatgpt-|text-embedding-|davinci|babbage)")
ANALYSIS_TOKENS = 150  # completion estimate: an assessment of about this length, then the rewrite


def token_counter(config: ReflectConfig):
    """(count_messages, count_text, description): tiktoken for OpenAI names, else an HF tokenizer."""
    name = config.model.split("/")[-1]
    if config.tokenizer is None and _OPENAI_NAME.match(name):
        try:
            import tiktoken

            try:
                enc = tiktoken.encoding_for_model(name)
            except KeyError:
                enc = tiktoken.get_encoding("o200k_base")
            text = lambda s: len(enc.encode(s, disallowed_special=()))  # noqa: E731
            return _per_message(text), text, f"tiktoken {enc.name}"
        except Exception as e:  # the encoding files are downloaded on first use; offline they are missing
            log.warning("tiktoken could not load an encoding for %s (%s); estimating 4 characters per token",
                        name, str(e).splitlines()[0][:120])
            return _heuristic()
    spec = config.tokenizer or config.model
    from reflect_tune.models import load_tokenizer, resolve_model

    if config.tokenizer is None:
        try:
            resolve_model(spec)
            local = spec.startswith("bundled:") or Path(spec).exists()
        except ReflectTuneError:
            local = False
        if not local:
            log.warning("no tokenizer for %s (pass --tokenizer SPEC for exact counts); estimating 4 characters per token", spec)
            return _heuristic()
    tok = load_tokenizer(spec)
    text = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    if getattr(tok, "chat_template", None):
        def messages(msgs):
            ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
            return len(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    else:
        messages = _per_message(text)
    return messages, text, f"tokenizer of {spec}"


def _per_message(text):
    """Chat tokens without a template: each message's content plus ~4 framing tokens, plus 3 to prime the reply."""
    return lambda msgs: sum(text(m["content"]) + 4 for m in msgs) + 3


def _heuristic():
    text = lambda s: max(1, len(s) // 4)  # noqa: E731
    return _per_message(text), text, "about 4 characters per token"


def dry_run(config: ReflectConfig, records, prompts: Prompts, cache: RequestCache) -> dict[str, Any]:
    """Plan the run against the cache: what would be sent, its tokens and its cost."""
    client = TeacherClient(model=config.model, base_url=config.base_url, api_key=None, params=config.params(),
                           cache=cache, collect=True)
    lines = asyncio.run(walk(records, client, prompts, config, progress=False))
    bodies = list(client.pending.values())
    # res_ins waits for ins: when ins is not cached yet, estimate its prompt from the original pair
    for rec, line in zip(records, lines):
        if line["variants"]["res_ins"]["status"] == "pending":
            template = prompts.texts["response"]
            msgs = [{"role": "user", "content": render(template, {"instruction": rec.instruction_text, "output": rec.output},
                                                        choose_tag(rec.instruction_text, "", rec.output))}]
            bodies.append({"messages": msgs, "estimated": True})
    count_messages, count_text, how = token_counter(config)
    empty = {k: count_text(render(prompts.texts[k], {}, "0" * 8)) for k in ("instruction", "response", "response_input")}
    prompt_tokens = completion_tokens = 0
    kinds = {"ins": 0, "res": 0}
    for body in bodies:
        n = count_messages(body["messages"])
        last = body["messages"][-1]["content"]
        is_ins = any(m.group(1) == "NEW INSTRUCTION" for m in MARKER.finditer(last))
        kinds["ins" if is_ins else "res"] += 1
        data = max(count_text(last) - empty["instruction" if is_ins else "response"], 0)
        prompt_tokens += n
        completion_tokens += min(config.max_tokens, ANALYSIS_TOKENS + int(data * (1.5 if is_ins else 1.0)))
    p_in, p_out, source = price_for(config)
    est_cost = cost(prompt_tokens, completion_tokens, config)
    plan = {
        "records": len(records), "requests": len(bodies), "instruction_requests": kinds["ins"],
        "response_requests": kinds["res"], "cached_requests": client.stats.cached,
        "prompt_tokens": prompt_tokens, "est_completion_tokens": completion_tokens,
        "price_in_per_1m": p_in, "price_out_per_1m": p_out, "price_source": source, "est_cost_usd": est_cost,
        "token_counting": how,
    }
    return plan
