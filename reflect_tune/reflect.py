"""Stage 1, `reflect-tune reflect`: a teacher LLM rewrites every instruction pair.

Per input record, three teacher calls (the variants the paper's selection compares):

- `ins`: instruction reflection of the original pair (x0, y0) gives a new pair (x_ins, y_ins);
- `res`: response reflection of the original pair gives a better answer y_res;
- `res_ins`: response reflection of (x_ins, y_ins) gives y_res_ins. It waits for `ins`.

The prompts are files in `reflect_tune/prompts/` (the default set `paper`; `--prompts conservative`
picks the other built-in set, `--prompts DIR` overrides any file). The teacher writes its text
between markers; each request gets its own marker tag (`[[BETTER ANSWER 3fa9c1d2]]`)
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
import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reflect_tune.artifacts import check_output_file
from reflect_tune.config import ReflectConfig, SettingError
from reflect_tune.errors import ReflectTuneError, looks_like_secret, register_secret
from reflect_tune.cache import CacheFull, RequestCache
from reflect_tune.layout import (
    MARKER, Prompts, check_json_ready, choose_tag, json_fields, json_prompt, layout, load_prompts, parse_blocks, parse_json, render,
    response_format,
)
from reflect_tune.prices import PRICES, PRICES_DATE, table_row
from reflect_tune.teacher import (
    REJECTED, ApiFailed, FatalApiError, Pending, TeacherClient, check_api_key, rough_tokens, wait_workers,
)
from reflect_tune.teacher import request_params as teacher_params

log = logging.getLogger("reflect_tune.reflect")

STAGES = ("instruction", "response")
VARIANTS = ("ins", "res", "res_ins")
RESPONSE_FORMATS = ("markers", "json", "auto")
BACKENDS = ("http", "transformers")


# ---------------------------------------------------------------------------------------------
# One record
# ---------------------------------------------------------------------------------------------


def _usage() -> dict[str, int]:
    return {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0}


def _variant(status: str, reason: str | None, usage: dict[str, int], **texts: Any) -> dict[str, Any]:
    return {"status": status, "reason": reason, **texts, "usage": usage}


async def ask(client: TeacherClient, prompts: Prompts, kind: str, instruction: str, input: str, output: str,
              reask: bool = True, fmt: str = "markers") -> dict:
    """One reflection (with its single re-ask). Returns the variant as written to the output.

    `fmt`: "markers" (tagged blocks in free text) or "json" (response_format json_schema)."""
    if kind == "ins":
        template, names = prompts.texts["instruction"], ("NEW INSTRUCTION", "NEW ANSWER")
        values = {"instruction": instruction + ("\n" + input if input else ""), "output": output}
    else:
        template, names = prompts.texts["response_input" if input else "response"], ("BETTER ANSWER",)
        values = {"instruction": instruction, "input": input, "output": output}
    schema_kind = "instruction" if kind == "ins" else "response"
    tag = choose_tag(instruction, input, output)
    extra = None
    if fmt == "json":
        template = json_prompt(prompts, template, schema_kind)
        extra = {"response_format": response_format(prompts, schema_kind)}
    messages = [{"role": "user", "content": render(template, values, tag)}]
    if prompts.texts["system"].strip():
        messages.insert(0, {"role": "system", "content": prompts.texts["system"]})
    usage = _usage()
    problem = None
    try:
        for attempt in range(2 if reask else 1):
            reply = await client.chat(messages, extra=extra)
            usage["requests"] += 1
            usage["prompt_tokens"] += reply.prompt_tokens
            usage["completion_tokens"] += reply.completion_tokens
            if fmt == "json":
                blocks, why = parse_json(reply.text, names, prompts.placeholders, reply.finish_reason)
            else:
                blocks, why = parse_blocks(reply.text, names, tag, prompts.placeholders, reply.finish_reason)
            if blocks is not None:
                if kind == "ins":
                    return _variant("ok", None, usage, instruction=blocks["NEW INSTRUCTION"], input="",
                                    output=blocks["NEW ANSWER"])
                return _variant("ok", None, usage, output=blocks["BETTER ANSWER"])
            problem = why if problem is None else f"{problem}; after re-ask: {why}"
            shape = layout(names, tag) if fmt == "markers" else prompts.texts["json"].replace("{fields}", json_fields(prompts, schema_kind))
            reask = render(prompts.texts["reask"], {"problem": why, "layout": shape}, tag)
            messages = messages + [{"role": "assistant", "content": reply.text}, {"role": "user", "content": reask}]
    except ApiFailed as e:
        return _variant("api_failed", e.reason, usage, **_no_text(kind))
    except Pending:
        return _variant("pending", "not in the cache yet", usage, **_no_text(kind))
    return _variant("parse_failed", problem, usage, **_no_text(kind))


def _no_text(kind: str) -> dict[str, None]:
    return {"instruction": None, "input": None, "output": None} if kind == "ins" else {"output": None}


async def reflect_record(rec, client: TeacherClient, prompts: Prompts, stages: tuple[str, ...], reask: bool = True,
                         fmt: str = "markers") -> dict:
    """All requested variants of one record; `ins` and `res` run concurrently, `res_ins` after `ins`."""
    jobs = {}
    if "instruction" in stages:
        jobs["ins"] = ask(client, prompts, "ins", rec.instruction, rec.input, rec.output, reask, fmt)
    if "response" in stages:
        jobs["res"] = ask(client, prompts, "res", rec.instruction, rec.input, rec.output, reask, fmt)
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
        variants["res_ins"] = await ask(client, prompts, "res_ins", ins["instruction"], "", ins["output"], reask, fmt)
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
    _validate_teacher(config)
    check_api_key_env(config.api_key_env)
    api_key(config)
    prompts = load_prompts(config.prompts)
    if config.response_format != "markers":
        check_json_ready(prompts)
    request_params(config)  # --extra-body and --token-param mistakes, before the input is read
    out = Path(config.output)
    if out.suffix != ".jsonl":
        raise ReflectTuneError(f"{out}: the reflect output is JSON Lines; name it *.jsonl")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ReflectTuneError(f"{out}: the folder {parent} does not exist")
    check_output_file(out, [config.input])  # not a folder, not the input, and writable: before any request


def _validate_teacher(config: ReflectConfig) -> None:
    """--response-format and --backend, and the settings that only one backend takes."""
    if config.response_format not in RESPONSE_FORMATS:
        raise SettingError("response_format", f"--response-format: expected one of {', '.join(RESPONSE_FORMATS)}, "
                                              f"got {config.response_format!r}")
    if config.backend not in BACKENDS:
        raise SettingError("backend", f"--backend: expected one of {', '.join(BACKENDS)}, got {config.backend!r}")
    if config.critique_tokens < 0:
        raise SettingError("critique_tokens", "--critique-tokens must be 0 or more")
    if config.batch_size is not None and config.batch_size < 1:
        raise SettingError("batch_size", "--batch-size must be at least 1")
    if config.backend == "transformers":
        for name, bad in (("base_url", config.base_url is not None), ("batch_api", config.batch_api),
                          ("extra_body", bool(config.extra_body)), ("response_format", config.response_format == "json")):
            if bad:
                raise SettingError(name, f"--{name.replace('_', '-')} is for an HTTP teacher; --backend transformers runs "
                                         "the model in this process and keeps to the markers layout by construction")
        from reflect_tune.models import resolve_model

        resolve_model(config.model)  # a model spec that resolves here (bundled:, a folder, a hub id in the cache)
    elif config.response_format != "markers" and "response_format" in (config.extra_body or {}):
        raise SettingError("extra_body", f"--extra-body: 'response_format' is sent by --response-format "
                                         f"{config.response_format}; leave it out of --extra-body")
    if config.backend == "http":
        defaults = {"critique_tokens": 0, "batch_size": None, "device": "auto", "dtype": "auto"}
        for name, default in defaults.items():
            if getattr(config, name) != default:
                raise SettingError(name, f"--{name.replace('_', '-')} only applies with --backend transformers")


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
    if not config.dry_run:  # a dry run sends nothing
        check_api_key(key, f"the environment variable {config.api_key_env}")
    if key is None and config.base_url is None and config.backend == "http" and not config.dry_run:
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
                                   on_duplicate="drop" if config.dedupe else "error", turns=config.turns)
    if not records:
        raise ReflectTuneError(f"{config.input}: no records to reflect")
    for line in report.warnings():
        log.warning("warning: %s", line)
    key = api_key(config)
    cache = RequestCache(_cache_folder(config))
    started = time.time()
    try:
        if config.dry_run:
            if config.response_format == "auto":
                config = dataclasses.replace(config, response_format=resolve_response_format(config, None, cache.folder)[0])
            return ReflectResult(status="planned", summary=dry_run(config, records, prompts, cache), output=config.output)
        cache.ensure_reserve()  # room to keep the replies in flight if the disk fills up
        client = TeacherClient(model=config.model, base_url=config.base_url, api_key=key, params=request_params(config),
                               cache=cache, concurrency=config.concurrency, rpm=config.rpm, tpm=config.tpm,
                               timeout=config.timeout, max_retries=config.max_retries, backoff=config.backoff,
                               local=_local_teacher(config))
        if config.response_format == "auto":
            used, why = resolve_response_format(config, client, cache.folder)
            log.info("--response-format auto: %s (%s)", used, why)
            config = dataclasses.replace(config, response_format=used)
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


def request_params(config: ReflectConfig) -> dict[str, Any]:
    """What every request carries besides its messages (and so its cache key): for a server,
    `teacher.request_params` decides the form. The in-process teacher's keys say so, so a server
    that happens to use the same model name never shares its replies."""
    if config.backend == "transformers":
        return {"backend": "transformers", "temperature": config.temperature, "top_p": config.top_p,
                "max_tokens": config.max_tokens, "critique_tokens": config.critique_tokens}
    return teacher_params(model=config.model, base_url=config.base_url, max_tokens=config.max_tokens,
                          temperature=config.temperature, top_p=config.top_p, token_param=config.token_param,
                          extra_body=config.extra_body)


def _local_teacher(config: ReflectConfig):
    if config.backend != "transformers":
        return None
    from reflect_tune.local_teacher import LocalTeacher

    log.info("loading the teacher %s in this process (--backend transformers)", config.model)
    return LocalTeacher(spec=config.model, device=config.device, dtype=config.dtype, batch_size=config.batch_size,
                        critique_tokens=config.critique_tokens, temperature=config.temperature, top_p=config.top_p)


PROBE_FILE = "response_format.json"  # in the cache folder: {"BASE_URL MODEL": {"json": bool, "why": str, "checked": date}}


def resolve_response_format(config: ReflectConfig, client: TeacherClient, folder: Path) -> tuple[str, str]:
    """`auto`: json where the server honours response_format json_schema, else markers.

    The in-process teacher always takes markers. For a server, one probe request answers; the
    answer is remembered per base URL and model in the cache folder (delete the file to probe again)."""
    if config.backend == "transformers":
        return "markers", "the in-process teacher keeps to the markers by construction"
    from reflect_tune.artifacts import atomic_path

    where = f"{config.base_url or 'https://api.openai.com/v1'} {config.model}"
    path = folder / PROBE_FILE
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(where), dict) and isinstance(known[where].get("json"), bool):
        entry = known[where]
        return ("json" if entry["json"] else "markers"), f"{entry.get('why', '')}; remembered in {path}"
    if config.dry_run:
        return "markers", "not probed in a dry run; markers assumed"

    async def probe():
        try:
            return await client.probe_json(PROBE_SCHEMA)
        finally:
            await client.aclose()

    ok, why = asyncio.run(probe())
    known[where] = {"json": ok, "why": why, "checked": time.strftime("%Y-%m-%d")}
    try:
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(known, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    except OSError as e:
        log.warning("could not remember the probe in %s (%s); the next run probes again", path, e.strerror or e)
    return ("json" if ok else "markers"), why


PROBE_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}


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
            results[i] = await reflect_record(records[i], client, prompts, config.stages, config.reask,
                                              "json" if config.response_format == "json" else "markers")
            bar.record_done(results[i])

    workers = [asyncio.create_task(worker()) for _ in range(min(config.concurrency, len(records)))]
    client.on_update = bar.refresh
    try:
        await wait_workers(client, workers)
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
    """Records done/total, requests/s, tokens/s and failures on stderr (progress.py: a rich bar on a
    terminal, a plain line every REFLECT_TUNE_PROGRESS_INTERVAL seconds elsewhere, then a final line)."""

    def __init__(self, total: int, client: TeacherClient, enabled: bool):
        from reflect_tune.progress import Progress

        self.client, self.started = client, time.monotonic()
        self.failed = 0
        self.bar = Progress("reflect", total, unit="records", rate_unit="rec", enabled=enabled)
        self.bar.update(failed=0)
        self.refresh()

    def record_done(self, line: dict) -> None:
        self.failed += sum(v["status"] in ("api_failed", "parse_failed") for v in line["variants"].values())
        self.bar.update(advance=1, failed=self.failed)
        self.refresh()

    def refresh(self) -> None:
        s, dt = self.client.stats, max(time.monotonic() - self.started, 1e-6)
        self.bar.update(note=f"{(s.succeeded + s.cached) / dt:.1f} req/s, {(s.prompt_tokens + s.completion_tokens) / dt:.0f} tok/s")

    def close(self) -> None:
        self.refresh()
        self.bar.close()


def price_for(config: ReflectConfig) -> tuple[float | None, float | None, str]:
    """USD per 1M prompt and completion tokens, and where the figures came from."""
    if config.price_in is not None or config.price_out is not None:
        return config.price_in or 0.0, config.price_out or 0.0, "--price-in/--price-out"
    if config.backend == "transformers":
        return 0.0, 0.0, "in-process teacher (--backend transformers): no API cost"
    row = table_row(config.model)
    if row is None:
        return None, None, "unknown model: pass --price-in/--price-out"
    p_in, p_out = PRICES[row]
    if config.batch_api:
        return p_in / 2, p_out / 2, f"built-in table ({PRICES_DATE}, {row}, Batch API half price)"
    return p_in, p_out, f"built-in table ({PRICES_DATE}, {row})"


def cost(prompt_tokens: int, completion_tokens: int, config: ReflectConfig) -> float | None:
    """USD for the tokens. `completion_tokens` as OpenAI reports them already hold the reasoning
    tokens (billed as output), so they are priced here once and never added again."""
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
    extra = {}
    if config.batch_api:  # the whole job's figures are the summary's; each round's are here (batch.account)
        extra["batch_rounds"] = [{**r, "cost_usd": cost(r["prompt_tokens"], r["completion_tokens"], config)}
                                 for r in client.batch_rounds]
    return {
        "records": len(lines),
        "requests_sent": s.sent, "requests_answered": s.succeeded, "requests_cached": s.cached,
        "requests_from_other_process": s.waited_for_others, "variants_rejected": rejected,
        "retries": s.retries, "retries_by_kind": dict(s.retry_kinds), "failures_by_kind": failures,
        "variants": statuses, "response_format": config.response_format, "backend": config.backend,
        "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens, "reasoning_tokens": s.reasoning_tokens,
        "cached_prompt_tokens": s.cached_prompt_tokens, "cached_completion_tokens": s.cached_completion_tokens,
        "cached_reasoning_tokens": s.cached_reasoning_tokens,
        "cost_usd": cost(s.prompt_tokens, s.completion_tokens, config), "price_source": price_source,
        "rate_limit_wait_s": round(client.limiter.waited, 3), "wall_s": round(wall, 3), **extra,
    }


def _write(config: ReflectConfig, lines: list[dict], prompts: Prompts, report, summary: dict) -> None:
    from reflect_tune.artifacts import atomic_path, provenance, write_meta

    meta = provenance("reflect", config, inputs=[config.input] if Path(config.input).exists() else [])
    meta["prompts"] = {name: {"source": prompts.sources[name], "sha256": prompts.sha256[name]} for name in prompts.texts}
    # the built-in set the prompts come from (a --prompts folder overrides some of its files: see the sources)
    meta["prompt_set"] = {"name": prompts.set_name, "folder": prompts.folder}
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
        enc = tiktoken_encoding(name)
        if enc is None:
            return _heuristic()
        text = lambda s: len(enc.encode(s, disallowed_special=()))  # noqa: E731
        return _per_message(text), text, f"tiktoken {enc.name}"
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


TIKTOKEN_FILES = "https://openaipublic.blob.core.windows.net/encodings"  # where tiktoken downloads {name}.tiktoken


def tiktoken_folder() -> Path:
    """Where tiktoken keeps its encoding files for us: TIKTOKEN_CACHE_DIR when the user set it, else
    $REFLECT_TUNE_CACHE/tiktoken (tiktoken's own default is a temporary folder)."""
    from reflect_tune.models import cache_dir

    return Path(os.environ.get("TIKTOKEN_CACHE_DIR") or cache_dir() / "tiktoken")


def tiktoken_encoding(model: str):
    """tiktoken's encoding for an OpenAI model name (o200k_base for a name tiktoken does not know),
    or None with one warning line when it cannot be had. Its file is downloaded once (tiktoken
    checks its sha256) into `tiktoken_folder()`; TIKTOKEN_CACHE_DIR is set for this call only."""
    try:
        import tiktoken
        from tiktoken.model import encoding_name_for_model
    except ImportError:
        log.warning("warning: tiktoken is not installed (pip install tiktoken); estimating 4 characters per token")
        return None
    try:
        name = encoding_name_for_model(model)
    except KeyError:
        name = "o200k_base"
    folder = tiktoken_folder()
    before = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = before if before is not None else str(folder)
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # offline, a proxy refusing, a damaged download, a read-only folder
        url = f"{TIKTOKEN_FILES}/{name}.tiktoken"
        where = folder / hashlib.sha1(url.encode()).hexdigest()  # tiktoken's name for the cached file
        network = type(e).__module__.split(".")[0] in ("requests", "urllib3")  # its text is a long repr of the pool
        why = type(e).__name__ if network else " ".join(f"{type(e).__name__}: {e}".split())[:160]
        log.warning("warning: tiktoken could not %s %s (%s); it would be cached as %s (put the file there to "
                    "count offline); estimating 4 characters per token", "fetch" if network else "load", url, why, where)
        return None
    finally:
        if before is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR", None)
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = before


def _per_message(text):
    """Chat tokens without a template: each message's content plus ~4 framing tokens, plus 3 to prime the reply."""
    return lambda msgs: sum(text(m["content"]) + 4 for m in msgs) + 3


def _heuristic():
    text = lambda s: max(1, len(s) // 4)  # noqa: E731
    return _per_message(text), text, "about 4 characters per token"


def dry_run(config: ReflectConfig, records, prompts: Prompts, cache: RequestCache) -> dict[str, Any]:
    """Plan the run against the cache: what would be sent, its tokens and its cost."""
    client = TeacherClient(model=config.model, base_url=config.base_url, api_key=None, params=request_params(config),
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
        # the reasoning-model form: its reasoning tokens, billed as completion tokens, are not estimated
        "token_param": "max_completion_tokens" if "max_completion_tokens" in client.params else "max_tokens",
    }
    return plan
