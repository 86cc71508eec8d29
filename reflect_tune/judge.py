"""`reflect-tune judge`: the judged win rate of a model against a baseline (AlpacaEval-style).

1. Both local models answer every prompt: greedy, batched with left padding, the prompt shown
   with the model's chat template (`template: chat`) or the Alpaca prompt. Each answer is appended
   (fsynced) to `answers_model.jsonl` / `answers_baseline.jsonl` as soon as its batch is done, keyed
   by record id, prompt, model spec and generation settings: a rerun generates only what is missing.
2. The judge (any OpenAI-compatible server, through the same `TeacherClient` as `reflect`: cache,
   limits, retries, Batch API, dry run) sees each prompt twice, once with the model's answer
   first and once with the baseline's first, and ends each reply with `Verdict: [[1]]`,
   `[[2]]` or `[[tie]]`. An unusable reply is re-asked once.
3. The two orders combine per prompt: both prefer the model -> win; both prefer the baseline ->
   loss; anything else (they disagree, or either says tie) -> tie. A prompt whose request failed
   (`api_failed`) or whose reply could not be read after the re-ask (`parse_failed`) is counted
   apart and left out of the win rate.
4. Win rate = (wins + ties/2) / judged, with a 95% Wilson score interval (ties as half a success).

Outputs in the folder `-o`: verdicts.jsonl, judge.json, judge.md, meta.json and the two answer files.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

from reflect_tune.cache import CacheFull
from reflect_tune.config import JudgeConfig, SettingError
from reflect_tune.errors import DataError, ModelError, ReflectTuneError, clip, register_secret
from reflect_tune.teacher import ApiFailed, FatalApiError, Pending, TeacherClient, rough_tokens, wait_workers

log = logging.getLogger("reflect_tune.judge")

SIDES = ("model", "baseline")
TEMPLATES = ("chat", "alpaca")
PLACEHOLDERS = ("instruction", "answer_1", "answer_2")
OUTPUT_NAMES = ("answers_model.jsonl", "answers_baseline.jsonl", "verdicts.jsonl", "judge.json", "judge.md", "meta.json")
Z95 = 1.959963984540054
JUDGE_REPLY_TOKENS = 200  # --dry-run's completion estimate per request (a short reasoning and the verdict line)
REASK = ("Your reply did not end with a verdict I can read ({problem}). Reply with exactly one line: "
         "Verdict: [[1]], Verdict: [[2]] or Verdict: [[tie]].")
_FILL = re.compile(r"\{(instruction|answer_1|answer_2)\}")
_VERDICT = re.compile(r"\[\[\s*(1|2|tie)\s*\]\]", re.IGNORECASE)
_STATED = re.compile(r"verdict\W*\[\[\s*(1|2|tie)\s*\]\]", re.IGNORECASE)
_SHOWN = re.compile(r"<<<ANSWER 1>>>\n(.*?)\n<<<END ANSWER 1>>>.*?<<<ANSWER 2>>>\n(.*?)\n<<<END ANSWER 2>>>", re.S)


# ---------------------------------------------------------------------------------------------
# The judge prompt and its verdict
# ---------------------------------------------------------------------------------------------


def load_judge_prompt(path: str | None) -> tuple[str, str, str]:
    """(text, source, sha256) of the judge prompt: `path`, else the packaged prompts/judge.txt."""
    from importlib import resources

    source = Path(path) if path else resources.files("reflect_tune") / "prompts" / "judge.txt"
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ReflectTuneError(f"{source}: cannot read the judge prompt: {getattr(e, 'strerror', None) or e}") from None
    for name in PLACEHOLDERS:
        if "{" + name + "}" not in text:
            raise ReflectTuneError(f"{source}: the judge prompt lacks the placeholder {{{name}}} "
                                   f"(it needs {', '.join('{' + p + '}' for p in PLACEHOLDERS)})")
    return text.strip("\n"), str(source), hashlib.sha256(text.encode("utf-8")).hexdigest()


def fill(template: str, instruction: str, first: str, second: str) -> str:
    """The prompt with its placeholders filled in one pass (an answer holding "{answer_2}" stays as it is)."""
    values = {"instruction": instruction, "answer_1": first, "answer_2": second}
    return _FILL.sub(lambda m: values[m.group(1)], template)


def shown_answers(text: str) -> tuple[str, str] | None:
    """The two answers as the built-in prompt shows them (the fake test server's judge reads them so)."""
    m = _SHOWN.search(text)
    return (m.group(1), m.group(2)) if m else None


def parse_verdict(text: str, finish_reason: str | None = "stop") -> tuple[str | None, str | None]:
    """("1" | "2" | "tie", None) from the last line that holds a verdict, or (None, the problem).

    A reply that states all three "Verdict: [[...]]" lines (an echo of the instructions) or whose
    last verdict line holds two different verdicts is not read."""
    found = [(m.group(1).lower(), text.count("\n", 0, m.start())) for m in _VERDICT.finditer(text)]
    if not found:
        return None, "no [[1]], [[2]] or [[tie]] (the reply hit --max-tokens)" if finish_reason == "length" \
            else "no [[1]], [[2]] or [[tie]]"
    if {m.group(1).lower() for m in _STATED.finditer(text)} == {"1", "2", "tie"}:
        return None, "the reply repeats all three verdict options"
    last_line = found[-1][1]
    on_last = {v for v, line in found if line == last_line}
    if len(on_last) > 1:
        return None, f"two verdicts on one line ({' and '.join(sorted(on_last))})"
    return found[-1][0], None


def combine(first_order: str, second_order: str) -> str:
    """The prompt's verdict from the model-first reply and the baseline-first reply: both prefer
    the model -> win, both prefer the baseline -> loss, anything else -> tie."""
    a = {"1": "model", "2": "baseline", "tie": "tie"}[first_order]
    b = {"1": "baseline", "2": "model", "tie": "tie"}[second_order]
    return "win" if a == b == "model" else "loss" if a == b == "baseline" else "tie"


def wilson(score: float, n: int, z: float = Z95) -> tuple[float | None, float | None]:
    """The Wilson score interval of a proportion `score` over `n` trials (a tie counts as half)."""
    if n <= 0:
        return None, None
    centre = (score + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(score * (1 - score) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


# ---------------------------------------------------------------------------------------------
# Checks before anything is loaded or sent
# ---------------------------------------------------------------------------------------------


def validate(cfg: JudgeConfig) -> list:
    """Settings, the API key, the prompt file, the data file, the models' files and the output
    folder: everything that can fail before a model loads or a request is sent. Returns the prompts."""
    from reflect_tune.artifacts import check_output_folder, clear_folder, owned_by
    from reflect_tune.records import FORMATS, TURN_POLICIES
    from reflect_tune.reflect import check_api_key_env

    for name, choices in (("template", TEMPLATES), ("turns", TURN_POLICIES), ("format", (None, *FORMATS))):
        if getattr(cfg, name) not in choices:
            raise SettingError(name, f"--{name}: expected one of {', '.join(c for c in choices if c)}, got {clip(getattr(cfg, name))}")
    for name in ("max_new_tokens", "batch_size", "concurrency", "max_tokens", "limit", "rpm", "tpm"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise SettingError(name, f"--{name.replace('_', '-')} must be at least 1")
    if cfg.no_wait and not cfg.batch_api:
        raise SettingError("no_wait", "--no-wait only applies with --batch-api")
    check_api_key_env(cfg.api_key_env)
    api_key(cfg)
    load_judge_prompt(cfg.prompt)
    request_params(cfg)
    records = read_prompts(cfg)
    for spec, flag in ((cfg.model, "--model"), (cfg.baseline, "--baseline")):
        check_model(spec, flag, cfg.template)
    out = Path(cfg.output)
    check_output_folder(out, [cfg.data, cfg.model, cfg.baseline, cfg.prompt])
    if out.is_dir() and any(out.iterdir()):
        if cfg.overwrite:
            clear_folder(out, "judge", OUTPUT_NAMES, check_only=True)
        elif not owned_by(out, "judge"):
            raise ReflectTuneError(f"{out}: not empty and not a folder reflect-tune judge wrote; choose a new --output")
    return records


def api_key(cfg: JudgeConfig) -> str | None:
    """The key from the environment, registered as a secret; required for OpenAI itself unless --dry-run."""
    key = os.environ.get(cfg.api_key_env) or None
    register_secret(key)
    if key is None and cfg.base_url is None and not cfg.dry_run:
        raise ReflectTuneError(f"the environment variable {cfg.api_key_env} is not set (it holds the judge's API key; "
                               "use --api-key-env NAME for another variable, or --base-url for a local server)")
    return key


def request_params(cfg: JudgeConfig) -> dict[str, Any]:
    from reflect_tune.teacher import request_params as params

    return params(model=cfg.judge, base_url=cfg.base_url, max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                  top_p=1.0, token_param=cfg.token_param, extra_body=cfg.extra_body)




def check_model(spec: str, flag: str, template: str) -> None:
    """The spec resolves (a LoRA train output: its base does), and its folder has a tokenizer
    (with a chat template for --template chat). Nothing is loaded."""
    from reflect_tune.models import TOKENIZER_FILES, adapter_base, has_tokenizer, is_adapter_folder, resolve_model

    folder = Path(spec).expanduser()
    if is_adapter_folder(spec):
        if not any(folder.glob("adapter_model*.safetensors")):
            raise ModelError(f"{flag} {spec}: a LoRA adapter folder without adapter_model.safetensors")
        base = adapter_base(folder)
        if not has_tokenizer(folder):
            folder = Path(resolve_model(base).path)
        else:
            resolve_model(base)
    else:
        resolved = resolve_model(spec)
        if resolved.kind == "hub":
            return
        folder = Path(resolved.path)
    if not has_tokenizer(folder):
        raise ModelError(f"{flag} {spec}: no tokenizer in {folder} (expected one of {', '.join(TOKENIZER_FILES)})")
    if template == "chat" and not _has_chat_template(folder):
        raise ModelError(f"{flag} {spec}: its tokenizer has no chat template; pass --template alpaca")


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False


# ---------------------------------------------------------------------------------------------
# The prompts, and the answers of the two local models
# ---------------------------------------------------------------------------------------------


def read_prompts(cfg: JudgeConfig) -> list:
    """The records of the data file; a record without an `output` (a bare prompt) is taken too."""
    from reflect_tune.records import pairs_of
    from reflect_tune.sources import detect_format, iter_raw

    _, rows = iter_raw(cfg.data, split=cfg.split)
    fmt, records, seen = cfg.format, [], {}
    for loc, row in rows:
        where = f"{cfg.data}:{loc}"
        if isinstance(row, dict) and "instruction" in row and not {"output", "conversations", "messages"} & set(row):
            row = {**row, "output": ""}  # a prompt without a reference answer
        fmt = fmt or detect_format(row)
        if fmt is None:
            raise DataError(f"{where}: unknown record shape; expected instruction (and input, output), conversations or messages")
        for rec in pairs_of(row, fmt, where, cfg.turns)[0]:
            if not rec.instruction.strip():
                raise DataError(f"{where}: field 'instruction': empty")
            if rec.id in seen:
                raise DataError(f"{where}: field 'id': {clip(rec.id)} is used twice (first at {seen[rec.id]})")
            seen[rec.id] = where
            records.append(rec)
        if cfg.limit is not None and len(records) >= cfg.limit:
            break
    if not records:
        raise DataError(f"{cfg.data}: no prompts")
    return records[: cfg.limit]


def answer_key(rec, spec: str, cfg: JudgeConfig) -> str:
    """What an answer depends on: the record, the model and the generation settings."""
    blob = json.dumps([rec.id, rec.system, rec.instruction_text, spec, cfg.max_new_tokens, cfg.template, cfg.dtype])
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()[:20]


def read_answers(path: Path) -> dict[str, dict]:
    """The finished answers of a resume file by key; a torn last line (a kill mid-write) is skipped."""
    done: dict[str, dict] = {}
    if not path.is_file():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            done[row["key"]] = row
        except (ValueError, KeyError, TypeError):
            continue
    return done


def load_side(spec: str, cfg: JudgeConfig):
    """(model, tokenizer) of a spec; a LoRA train output is its base with the adapter folded in."""
    from reflect_tune.models import load_with_adapter

    return load_with_adapter(spec, merge=True, dtype=cfg.dtype, device=cfg.device, trust_remote_code=cfg.trust_remote_code)


def prompt_text(tok, rec, template: str) -> str:
    """What the model is given: its chat template with the generation prompt, or the Alpaca prompt."""
    if template == "alpaca":
        from reflect_tune.templates import alpaca_prompt

        return alpaca_prompt(rec.instruction, rec.input)
    messages = ([{"role": "system", "content": rec.system}] if rec.system else []) + \
        [{"role": "user", "content": rec.instruction_text}]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def generate_answers(side: str, spec: str, records, cfg: JudgeConfig, path: Path) -> tuple[dict[str, dict], int]:
    """Every record's answer from one model, resumed from `path`; returns (answers by key, generated now)."""
    import torch

    from reflect_tune.artifacts import append_durably
    from reflect_tune.progress import Progress

    done = read_answers(path)
    todo = [r for r in records if answer_key(r, spec, cfg) not in done]
    if not todo:
        return done, 0
    log.info("%s: %d answers to generate with %s (%d already in %s)", side, len(todo), spec, len(records) - len(todo), path)
    model, tok = load_side(spec, cfg)
    tok.padding_side = "left"
    stops = {tok.eos_token_id, tok.pad_token_id}
    eos = model.generation_config.eos_token_id
    stops |= set(eos) if isinstance(eos, (list, tuple)) else {eos}
    stops.discard(None)
    device = next(model.parameters()).device
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    bar = Progress(f"answers ({side})", len(records), unit="answers", rate_unit="ans", enabled=cfg.progress,
                   done=len(records) - len(todo))
    try:
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start:start + cfg.batch_size]
            enc = tok([prompt_text(tok, r, cfg.template) for r in batch], return_tensors="pt", padding=True,
                      add_special_tokens=cfg.template == "alpaca").to(device)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, do_sample=False, temperature=None,
                                     top_p=None, top_k=None, pad_token_id=tok.pad_token_id)
            lines = []
            for rec, ids in zip(batch, out[:, enc["input_ids"].shape[1]:].tolist()):
                cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
                text = tok.decode(ids[:cut], skip_special_tokens=True).strip()
                row = {"key": answer_key(rec, spec, cfg), "id": rec.id, "model": spec, "answer": text, "tokens": cut,
                       "chars": len(text), "stopped": cut < len(ids), "max_new_tokens": cfg.max_new_tokens,
                       "template": cfg.template}
                done[row["key"]] = row
                lines.append(json.dumps(row, ensure_ascii=False) + "\n")
            append_durably(fd, "".join(lines).encode("utf-8"))  # a kill loses at most this batch
            bar.update(advance=len(batch))
    finally:
        os.close(fd)
        bar.close()
    del model
    return done, len(todo)


# ---------------------------------------------------------------------------------------------
# Asking the judge
# ---------------------------------------------------------------------------------------------


async def ask(client: TeacherClient, template: str, instruction: str, first: str, second: str) -> dict[str, Any]:
    """One order of one prompt, with a single re-ask of an unreadable reply."""
    messages = [{"role": "user", "content": fill(template, instruction, first, second)}]
    usage = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
    problem, text = None, None
    try:
        for _ in range(2):
            reply = await client.chat(messages)
            text = reply.text
            usage["requests"] += 1
            usage["prompt_tokens"] += reply.prompt_tokens
            usage["completion_tokens"] += reply.completion_tokens
            verdict, why = parse_verdict(reply.text, reply.finish_reason)
            if verdict is not None:
                return {"status": "ok", "verdict": verdict, "reason": None, "reply": text, "usage": usage}
            problem = why if problem is None else f"{problem}; after re-ask: {why}"
            messages = messages + [{"role": "assistant", "content": reply.text},
                                   {"role": "user", "content": REASK.format(problem=why)}]
    except ApiFailed as e:
        return {"status": "api_failed", "verdict": None, "reason": e.reason, "kind": e.kind, "reply": text, "usage": usage}
    except Pending:
        return {"status": "pending", "verdict": None, "reason": "not in the cache yet", "reply": None, "usage": usage}
    return {"status": "parse_failed", "verdict": None, "reason": problem, "reply": text, "usage": usage}


async def judge_item(client: TeacherClient, template: str, item: dict) -> dict[str, Any]:
    """Both orders of one prompt (model first, then baseline first), and their combined verdict."""
    a, b = item["model"], item["baseline"]
    ab, ba = await asyncio.gather(ask(client, template, item["instruction"], a["answer"], b["answer"]),
                                  ask(client, template, item["instruction"], b["answer"], a["answer"]))
    statuses = {ab["status"], ba["status"]}
    status = next((s for s in ("pending", "api_failed", "parse_failed") if s in statuses), "judged")
    return {"id": item["id"], "status": status,
            "verdict": combine(ab["verdict"], ba["verdict"]) if status == "judged" else None,
            "verdict_model_first": ab["verdict"], "verdict_baseline_first": ba["verdict"],
            "model_tokens": a["tokens"], "model_chars": a["chars"],
            "baseline_tokens": b["tokens"], "baseline_chars": b["chars"],
            "reason": "; ".join(f"{o}: {r['reason']}" for o, r in (("model first", ab), ("baseline first", ba)) if r["reason"]) or None,
            "api_failure_kinds": [r["kind"] for r in (ab, ba) if r.get("kind")],
            "replies": {"model_first": ab["reply"], "baseline_first": ba["reply"]},
            "usage": {k: ab["usage"][k] + ba["usage"][k] for k in ab["usage"]}}


async def walk(items: list[dict], client: TeacherClient, template: str, cfg: JudgeConfig, progress: bool = True) -> list[dict]:
    """Judge every item with `concurrency` workers (the client bounds the requests in flight);
    a fatal API error stops the sending, lets the requests on the wire land in the cache, and is raised."""
    from reflect_tune.progress import Progress

    rows: list[dict | None] = [None] * len(items)
    order = iter(range(len(items)))
    bar = Progress("judge", len(items), unit="prompts", rate_unit="prompt", enabled=progress and cfg.progress)
    failed = 0

    async def worker() -> None:
        nonlocal failed
        for i in order:
            rows[i] = await judge_item(client, template, items[i])
            failed += rows[i]["status"] in ("api_failed", "parse_failed")
            bar.update(advance=1, failed=failed)

    tasks = [asyncio.create_task(worker()) for _ in range(min(cfg.concurrency, len(items)))]
    try:
        await wait_workers(client, tasks)
    finally:
        bar.close()
    return rows  # type: ignore[return-value]


async def _live(items, client: TeacherClient, template: str, cfg: JudgeConfig) -> list[dict]:
    try:
        return await walk(items, client, template, cfg)
    except FatalApiError as e:
        raise FatalApiError(f"{e} — stopped; the replies so far are cached, rerun the same command to resume") from None
    except CacheFull as e:  # a full disk: the replies already paid for are kept if they can be
        lost = client.save_unsaved()
        raise CacheFull(f"{e}" + (f"; {lost} paid replies could not be saved" if lost else "")) from None
    finally:
        await client.aclose()


# ---------------------------------------------------------------------------------------------
# Cost and the summary
# ---------------------------------------------------------------------------------------------


def price(cfg: JudgeConfig) -> tuple[float | None, float | None, str]:
    from reflect_tune.prices import PRICES, PRICES_DATE, table_row

    if cfg.price_in is not None or cfg.price_out is not None:
        return cfg.price_in or 0.0, cfg.price_out or 0.0, "--price-in/--price-out"
    row = table_row(cfg.judge)
    if row is None:
        return None, None, "unknown model: pass --price-in/--price-out"
    half = 0.5 if cfg.batch_api else 1.0
    return PRICES[row][0] * half, PRICES[row][1] * half, f"built-in table ({PRICES_DATE}, {row}{', Batch API half price' if cfg.batch_api else ''})"


def cost(prompt_tokens: int, completion_tokens: int, cfg: JudgeConfig) -> float | None:
    p_in, p_out, _ = price(cfg)
    return None if p_in is None else (prompt_tokens * p_in + completion_tokens * p_out) / 1e6


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 2) if values else None


def summarize(rows: list[dict], cfg: JudgeConfig, client: TeacherClient, wall: float, generated: dict[str, int]) -> dict[str, Any]:
    judged = [r for r in rows if r["status"] == "judged"]
    counts = Counter(r["verdict"] for r in judged)
    n, wins, ties, losses = len(judged), counts["win"], counts["tie"], counts["loss"]
    rate = (wins + ties / 2) / n if n else None
    low, high = wilson(rate, n) if n else (None, None)
    decisive = [r for r in judged if r["verdict"] != "tie"]
    winner = {"win": "model", "loss": "baseline"}
    loser = {"win": "baseline", "loss": "model"}
    uneven = [r for r in decisive if r["model_chars"] != r["baseline_chars"]]
    longer_won = sum((r[f"{winner[r['verdict']]}_chars"] > r[f"{loser[r['verdict']]}_chars"]) for r in uneven)
    s = client.stats
    return {
        "model": cfg.model, "baseline": cfg.baseline, "judge": cfg.judge, "prompts": len(rows),
        "judged": n, "wins": wins, "ties": ties, "losses": losses,
        "win_rate": None if rate is None else round(rate, 4),
        "win_rate_ci95": [None if low is None else round(low, 4), None if high is None else round(high, 4)],
        "interval": "Wilson score interval, 95%, over the judged prompts (a tie counts as half a win)",
        "combination": "both orders prefer the model: win; both prefer the baseline: loss; otherwise: tie",
        "failures": {k: sum(r["status"] == k for r in rows) for k in ("parse_failed", "api_failed")},
        "api_failures_by_kind": dict(Counter(k for r in rows for k in r["api_failure_kinds"])),
        "lengths": {
            "model_tokens": _mean([r["model_tokens"] for r in rows]), "model_chars": _mean([r["model_chars"] for r in rows]),
            "baseline_tokens": _mean([r["baseline_tokens"] for r in rows]),
            "baseline_chars": _mean([r["baseline_chars"] for r in rows]),
            "winner_tokens": _mean([r[f"{winner[r['verdict']]}_tokens"] for r in decisive]),
            "winner_chars": _mean([r[f"{winner[r['verdict']]}_chars"] for r in decisive]),
            "loser_tokens": _mean([r[f"{loser[r['verdict']]}_tokens"] for r in decisive]),
            "loser_chars": _mean([r[f"{loser[r['verdict']]}_chars"] for r in decisive]),
            "longer_answer_won": None if not uneven else round(longer_won / len(uneven), 4),
            "decisive_with_unequal_length": len(uneven),
        },
        "answers_generated": generated,
        "requests_sent": s.sent, "requests_answered": s.succeeded, "requests_cached": s.cached, "retries": s.retries,
        "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
        "cost_usd": cost(s.prompt_tokens, s.completion_tokens, cfg), "price_source": price(cfg)[2],
        "wall_s": round(wall, 3),
    }


def markdown(s: dict[str, Any]) -> str:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    L = s["lengths"]
    cost_text = "unknown" if s["cost_usd"] is None else f"${s['cost_usd']:.4f}"
    return "\n".join([
        f"# Judged win rate: {s['model']} vs {s['baseline']}", "",
        f"Judge: `{s['judge']}`; {s['prompts']} prompts, each judged in both orders.", "",
        "| wins | ties | losses | judged | win rate | 95% interval (Wilson) |", "| --- | --- | --- | --- | --- | --- |",
        f"| {s['wins']} | {s['ties']} | {s['losses']} | {s['judged']} | {pct(s['win_rate'])} | "
        f"{pct(s['win_rate_ci95'][0])} – {pct(s['win_rate_ci95'][1])} |", "",
        f"Win rate = (wins + ties/2) / judged. Rule: {s['combination']}.", "",
        f"Not judged (left out of the rate): parse_failed {s['failures']['parse_failed']}, "
        f"api_failed {s['failures']['api_failed']} {s['api_failures_by_kind'] or ''}".rstrip(), "",
        "## Answer length (judges favour longer answers; read the rate with this)", "",
        "| | mean tokens | mean characters |", "| --- | --- | --- |",
        f"| model | {L['model_tokens']} | {L['model_chars']} |", f"| baseline | {L['baseline_tokens']} | {L['baseline_chars']} |",
        f"| winning answer (wins and losses) | {L['winner_tokens']} | {L['winner_chars']} |",
        f"| losing answer | {L['loser_tokens']} | {L['loser_chars']} |", "",
        f"The longer answer won {pct(L['longer_answer_won'])} of {L['decisive_with_unequal_length']} decisive prompts "
        "whose answers differ in length.", "",
        f"Requests: {s['requests_answered']} answered, {s['requests_cached']} from cache, {s['retries']} retries; "
        f"tokens {s['prompt_tokens']} prompt + {s['completion_tokens']} completion; cost {cost_text} ({s['price_source']}).", ""])


def plan(items: list[dict], template: str, cfg: JudgeConfig, client: TeacherClient) -> dict[str, Any]:
    """--dry-run: what would be sent (the answers exist by now; they cost nothing)."""
    rows = asyncio.run(walk(items, client, template, cfg, progress=False))
    bodies = list(client.pending.values())
    count, how = (lambda text: rough_tokens(len(text))), "3 characters per token (an over-estimate)"
    if re.match(r"^(ft:)?(gpt-|o\d|chatgpt-)", cfg.judge):
        from reflect_tune.reflect import tiktoken_encoding

        enc = tiktoken_encoding(cfg.judge)
        if enc is not None:
            count, how = (lambda text: len(enc.encode(text, disallowed_special=()))), f"tiktoken {enc.name}"
    prompt_tokens = sum(count(m["content"]) + 4 for b in bodies for m in b["messages"])
    completion = len(bodies) * min(cfg.max_tokens, JUDGE_REPLY_TOKENS)
    source = price(cfg)[2]
    return {"prompts": len(rows), "requests": len(bodies), "cached_requests": client.stats.cached,
            "prompt_tokens": prompt_tokens, "est_completion_tokens": completion, "price_source": source,
            "token_counting": how,
            "est_cost_usd": cost(prompt_tokens, completion, cfg),
            "not_included": "re-asks of unreadable replies (one per parse failure)"}


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def run(cfg: JudgeConfig) -> dict[str, Any]:
    """Validate, generate the missing answers, judge both orders, write the outputs.
    Returns {"status": "done" | "planned" | "submitted", "summary": ..., "output": folder}."""
    from reflect_tune.artifacts import (atomic_path, atomic_write_text, claim_folder, clear_folder, exclusive, lock_beside,
                                        provenance, write_meta)
    from reflect_tune.cache import RequestCache
    from reflect_tune.models import cache_dir

    records = validate(cfg)
    template, prompt_source, prompt_sha = load_judge_prompt(cfg.prompt)
    key = api_key(cfg)
    out = Path(cfg.output)
    started = time.time()
    with exclusive(lock_beside(out), f"{out}"):
        if cfg.overwrite:
            clear_folder(out, "judge", OUTPUT_NAMES)
        claim_folder(out, "judge", OUTPUT_NAMES)
        answers, generated = {}, {}
        for side, spec in (("model", cfg.model), ("baseline", cfg.baseline)):
            answers[side], generated[side] = generate_answers(side, spec, records, cfg, out / f"answers_{side}.jsonl")
        items = [{"id": r.id, "instruction": r.instruction_text,
                  "model": answers["model"][answer_key(r, cfg.model, cfg)],
                  "baseline": answers["baseline"][answer_key(r, cfg.baseline, cfg)]} for r in records]
        cache = RequestCache(Path(cfg.cache_dir) if cfg.cache_dir else cache_dir() / "judge")
        try:
            client = TeacherClient(model=cfg.judge, base_url=cfg.base_url, api_key=key, params=request_params(cfg),
                                   cache=cache, concurrency=cfg.concurrency, rpm=cfg.rpm, tpm=cfg.tpm, timeout=cfg.timeout,
                                   max_retries=cfg.max_retries, backoff=cfg.backoff, collect=cfg.dry_run or cfg.batch_api)
            if cfg.dry_run:
                return {"status": "planned", "summary": plan(items, template, cfg, client), "output": str(out)}
            cache.ensure_reserve()
            if cfg.batch_api:
                from reflect_tune.batch import run_batches

                if not run_batches(cfg, items, template, client, key, walk):
                    return {"status": "submitted", "summary": {}, "output": str(out)}
                rows = asyncio.run(walk(items, client, template, cfg, progress=False))
            else:
                rows = asyncio.run(_live(items, client, template, cfg))
        finally:
            cache.close()
        summary = summarize(rows, cfg, client, time.time() - started, generated)
        with atomic_path(out / "verdicts.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        atomic_write_text(out / "judge.json", json.dumps(summary, indent=2) + "\n")
        atomic_write_text(out / "judge.md", markdown(summary))
        meta = provenance("judge", cfg, inputs=[p for p in (cfg.data, cfg.prompt) if p and Path(p).exists()])
        meta.update(prompt={"source": prompt_source, "sha256": prompt_sha}, summary=summary)
        write_meta(out, meta)
    return {"status": "done", "summary": summary, "output": str(out)}
