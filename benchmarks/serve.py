"""Serving throughput and latency: the continuous-batching `Engine` against concurrency, beside `generate`.

One fixed, seeded list of requests with mixed prompt lengths (16..256 tokens, log-uniform: as
many short prompts as long ones) and mixed answer lengths (max_new_tokens drawn from 8, 16, 32,
64, 128), greedy, no stop strings, on the model
of benchmarks/stream_vs_generate.py (the "bench" config's text dimensions, random weights, the
shipped tiny tokenizer, no eos), so every request generates exactly its max_new_tokens. Served:

- one at a time: `model.generate` per request, in order;
- static batches of 16: `model.generate` on 16 requests at a time in arrival order, left-padded,
  each batch running to the largest max_new_tokens in it (the head-of-line effect); only each
  request's own tokens count as useful;
- the engine at concurrency c (1, 2, 4, 8, 16, 32 by default): c client threads in a closed loop
  over the same list (each submits its next request when its previous one has finished), an
  `Engine` with max_batch = c slots (so no request waits in the queue for long) of the smallest
  cache that holds every request (prompt bucket + max_new_tokens).

Each row gives useful tokens/s and requests/s over the wall time of the whole list; for the
engine, time to first token (submit to first token, `metrics.first_token`) and inter-token
latency (`metrics.token_gap`), p50 and p99; and tokens/s against the two baselines. Every program
is compiled before timing (every prompt bucket and cache length used, for generate and for each
engine), and the run counts compilations while timing: the table says if any happened.

The machine's speed drifts (other work on the host, its use of memory bandwidth included, which
no counter here sees): right before each row, a short `generate` (the probe column) measures
it, so that rows run at different speeds show it.

Correctness: every engine answer must equal its request's one-at-a-time `generate` answer (greedy),
else the run reports the mismatches and exits with status 1.

Run: python benchmarks/serve.py [--requests 32] [--concurrency 1,2,4,8,16,32] [--seed 0] [--json serve.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import threading
import time

import jax
import numpy as np

from aria_jax.benchmark import OtherProcessesWatch, cpu_name, installed_version
from aria_jax.buckets import bucket_length, prompt_bucket
from aria_jax.engine import DEFAULT_DECODE_STEPS, DEFAULT_MAX_QUEUE, Engine
from stream_vs_generate import bench_model  # the script beside this one (its directory is on sys.path)

PROMPT_LENGTHS = (16, 256)  # prompt tokens, log-uniform in this range
ANSWER_LENGTHS = (8, 16, 32, 64, 128)  # max_new_tokens, drawn uniformly
TOKEN_IDS = (10, 500)  # the tiny vocabulary's ordinary tokens
STATIC_BATCH = 16
PROBE_PROMPT_TOKENS, PROBE_NEW_TOKENS = 16, 32
DEFAULT_CONCURRENCY = (1, 2, 4, 8, 16, 32)
DEFAULT_REQUESTS = 32
# The targets, at concurrency 16: aggregate tokens/s against the baselines.
TARGET_CONCURRENCY = 16
TARGET_VS_ONE_AT_A_TIME = 3.0
TARGET_VS_STATIC = 1.5

# ----------------------------------------------------------------------------- the requests


@dataclasses.dataclass(frozen=True)
class ServeRequest:
    prompt: np.ndarray  # (T,) int32 token ids
    max_new_tokens: int


def make_requests(count: int, seed: int) -> list[ServeRequest]:
    rng = np.random.default_rng(seed)
    lengths = np.rint(np.exp(rng.uniform(*np.log(PROMPT_LENGTHS), size=count))).astype(int)
    answers = rng.choice(ANSWER_LENGTHS, size=count)
    return [
        ServeRequest(rng.integers(*TOKEN_IDS, size=length).astype(np.int32), int(answer))
        for length, answer in zip(lengths, answers)
    ]


def cache_length(prompt_tokens: int, max_new_tokens: int) -> int:
    """The cache `generate` makes for a prompt: its bucket + max_new_tokens, bucketed."""
    return bucket_length(prompt_bucket(prompt_tokens) + max_new_tokens)


def static_batches(requests: list[ServeRequest]) -> list[list[ServeRequest]]:
    return [requests[start : start + STATIC_BATCH] for start in range(0, len(requests), STATIC_BATCH)]


def left_padded(batch: list[ServeRequest], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The batch's prompts left-padded to the longest: ids and attention mask (B, T)."""
    length = max(len(request.prompt) for request in batch)
    ids = np.full((len(batch), length), pad_id, np.int32)
    mask = np.zeros((len(batch), length), np.int32)
    for row, request in enumerate(batch):
        ids[row, length - len(request.prompt) :] = request.prompt
        mask[row, length - len(request.prompt) :] = 1
    return ids, mask


# ----------------------------------------------------------------------------- measuring


STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[serve {time.perf_counter() - STARTED:4.0f} s] {message}", file=sys.stderr, flush=True)


class CompileCounter:
    """Counts XLA compilations while it is entered: a timed section should have none."""

    def __init__(self):
        self.count = 0

    def _listen(self, event: str, seconds: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1

    def __enter__(self) -> "CompileCounter":
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)


class LatencyLog:
    """The engine's `metrics` hook: every first token's latency and every later token's gap."""

    def __init__(self):
        self.first_tokens: list[float] = []
        self.token_gaps: list[float] = []

    def first_token(self, seconds: float) -> None:
        self.first_tokens.append(seconds)

    def token_gap(self, seconds: float) -> None:
        self.token_gaps.append(seconds)


def percentiles(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}


@dataclasses.dataclass
class Row:
    name: str
    requests: int
    useful_tokens: int
    seconds: float
    compilations: int  # while timing: should be 0
    probe_tokens_per_second: float  # the machine's speed right before the row (`speed_probe`)
    other_processes_cpu_share: float
    time_to_first_token: dict | None = None  # seconds, p50 / p99
    inter_token_latency: dict | None = None  # seconds, p50 / p99
    concurrency: int | None = None
    mean_in_flight: float | None = None  # engine: requests submitted and not yet answered
    generated_tokens: int | None = None  # static batches: useful and wasted

    @property
    def tokens_per_second(self) -> float:
        return self.useful_tokens / self.seconds

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds


def speed_probe(model) -> float:
    """Tokens/s of one short greedy `generate` at batch 1 (mostly decode, which reads weights
    from memory as the rows do): how fast the machine runs right now."""
    ids = np.full((1, PROBE_PROMPT_TOKENS), TOKEN_IDS[0], np.int32)
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=PROBE_NEW_TOKENS, stop_strings=None)
    return PROBE_NEW_TOKENS / (time.perf_counter() - start)


def timed(name: str, model, run, **fields) -> tuple[Row, object]:
    """Probes the machine's speed, then runs `run()` once, timed; returns its row (without the
    latency figures) and its result."""
    probe = speed_probe(model)
    watch, start = OtherProcessesWatch(), time.perf_counter()
    with CompileCounter() as compiles:
        result, useful_tokens, requests = run()
    seconds = time.perf_counter() - start
    row = Row(name, requests, useful_tokens, seconds, compiles.count, probe, watch.share(), **fields)
    return row, result


# ----------------------------------------------------------------------------- generate


def warm_generate(model, calls: list[tuple[np.ndarray, np.ndarray, int]]) -> None:
    """Compiles what `generate(ids, attention_mask=mask, max_new_tokens=n)` runs for each call:
    the programs depend on the batch, the prompt bucket and the cache length, not on n."""
    seen = set()
    for ids, mask, max_new_tokens in calls:
        length = cache_length(ids.shape[1], max_new_tokens)
        key = (ids.shape[0], prompt_bucket(ids.shape[1]), length)
        if key not in seen:
            seen.add(key)
            model.generate(ids, attention_mask=mask, max_new_tokens=2, stop_strings=None, max_length=length)


def one_at_a_time_calls(requests):
    return [
        (request.prompt[None], np.ones((1, len(request.prompt)), np.int32), request.max_new_tokens)
        for request in requests
    ]


def static_calls(requests, pad_id):
    return [
        (*left_padded(batch, pad_id), max(request.max_new_tokens for request in batch))
        for batch in static_batches(requests)
    ]


def run_one_at_a_time(model, requests: list[ServeRequest]):
    def run():
        answers = []
        for ids, mask, max_new_tokens in one_at_a_time_calls(requests):
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, stop_strings=None)
            answers.append(out[0, ids.shape[1] :])
        return answers, sum(len(answer) for answer in answers), len(requests)

    return timed("generate, one at a time", model, run, concurrency=1)


def run_static(model, requests: list[ServeRequest]):
    pad_id = model.text_config.pad_id

    def run():
        answers, generated = [], 0
        for batch, (ids, mask, max_new_tokens) in zip(static_batches(requests), static_calls(requests, pad_id)):
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, stop_strings=None)
            generated += out.shape[0] * max_new_tokens
            answers += [row[ids.shape[1] : ids.shape[1] + request.max_new_tokens] for row, request in zip(out, batch)]
        return answers, sum(request.max_new_tokens for request in requests), len(requests)

    row, answers = timed(f"generate, static batches of {STATIC_BATCH}", model, run, concurrency=STATIC_BATCH)
    row.generated_tokens = sum(
        max_new_tokens * ids.shape[0] for ids, _, max_new_tokens in static_calls(requests, pad_id)
    )
    return row, answers


# ----------------------------------------------------------------------------- the engine


def warm_engine(engine: Engine, requests: list[ServeRequest]) -> None:
    """Compiles the engine's rounds (`warm_up`) and its prefill for every prompt bucket the
    requests use; the engine's thread has not started, so this runs the rounds itself."""
    engine.warm_up()
    buckets = sorted({prompt_bucket(len(request.prompt)) for request in requests})
    handles = [
        engine.submit(np.full((bucket,), TOKEN_IDS[0], np.int32), max_new_tokens=2, stop_strings=None)
        for bucket in buckets
    ]
    while engine.step():
        pass
    for handle in handles:
        handle.result()


def run_engine(model, requests: list[ServeRequest], concurrency: int, max_length: int, decode_steps: int):
    log(f"engine, concurrency {concurrency}: compiling")
    engine = Engine(
        model,
        max_batch=concurrency,
        max_length=max_length,
        decode_steps=decode_steps,
        max_queue=max(concurrency, DEFAULT_MAX_QUEUE),
    )
    warm_engine(engine, requests)
    latencies = engine.metrics = LatencyLog()
    completions = [None] * len(requests)
    seconds_in_engine = [0.0] * len(requests)
    next_index = iter(range(len(requests)))
    take_lock = threading.Lock()

    def client():
        # closed loop: the next request goes in when the previous one has finished
        while True:
            with take_lock:
                index = next(next_index, None)
            if index is None:
                return
            request, start = requests[index], time.perf_counter()
            completions[index] = engine.submit(
                request.prompt, max_new_tokens=request.max_new_tokens, stop_strings=None
            ).result()
            seconds_in_engine[index] = time.perf_counter() - start

    def run():
        clients = [threading.Thread(target=client, name=f"client-{k}") for k in range(concurrency)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        return completions, sum(len(completion.tokens) for completion in completions), len(requests)

    log(f"engine, concurrency {concurrency}: serving {len(requests)} requests")
    with engine:
        row, completions = timed(f"engine, concurrency {concurrency}", model, run, concurrency=concurrency)
    row.time_to_first_token = percentiles(latencies.first_tokens)
    row.inter_token_latency = percentiles(latencies.token_gaps)
    # below the concurrency while the clients start and once the list runs out
    row.mean_in_flight = sum(seconds_in_engine) / row.seconds
    return row, completions


# ----------------------------------------------------------------------------- the report


def mismatches(requests, references, answers) -> list[str]:
    """Requests whose answer differs from the one-at-a-time answer: one line each."""
    lines = []
    for index, (request, reference, answer) in enumerate(zip(requests, references, answers)):
        reference, answer = np.asarray(reference), np.asarray(answer)
        if reference.shape != answer.shape or np.any(reference != answer):
            agree = next(
                (k for k, (a, b) in enumerate(zip(reference, answer)) if a != b), min(len(reference), len(answer))
            )
            lines.append(
                f"request {index} (prompt {len(request.prompt)}, max_new_tokens {request.max_new_tokens}): "
                f"{len(answer)} tokens, the first {agree} equal to generate's {len(reference)}"
            )
    return lines


def number(value, digits: int, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def table(rows: list[Row], one_at_a_time: Row, static: Row) -> str:
    lines = [
        "| configuration | requests | useful tokens | seconds | tokens/s | requests/s | TTFT p50 s | TTFT p99 s "
        "| ITL p50 ms | ITL p99 ms | mean in flight | tokens/s vs one at a time | tokens/s vs static 16 "
        "| probe tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ttft, itl = row.time_to_first_token or {}, row.inter_token_latency or {}
        name = row.name + (f" (compiled {row.compilations}x while timed)" if row.compilations else "")
        lines.append(
            f"| {name} | {row.requests} | {row.useful_tokens} | {row.seconds:.1f} | {row.tokens_per_second:.1f} "
            f"| {row.requests_per_second:.2f} | {number(ttft.get('p50'), 2)} | {number(ttft.get('p99'), 2)} "
            f"| {number(itl.get('p50'), 0, 1e3)} | {number(itl.get('p99'), 0, 1e3)} | {number(row.mean_in_flight, 1)} "
            f"| {row.tokens_per_second / one_at_a_time.tokens_per_second:.2f}x "
            f"| {row.tokens_per_second / static.tokens_per_second:.2f}x | {row.probe_tokens_per_second:.1f} |"
        )
    return "\n".join(lines)


def target_lines(engine_rows: dict[int, Row], one_at_a_time: Row, static: Row) -> tuple[list[str], dict]:
    row = engine_rows.get(TARGET_CONCURRENCY)
    if row is None:
        return [f"targets: concurrency {TARGET_CONCURRENCY} was not run"], {}
    vs_one = row.tokens_per_second / one_at_a_time.tokens_per_second
    vs_static = row.tokens_per_second / static.tokens_per_second
    results = {
        "vs_one_at_a_time": {
            "reached": vs_one,
            "target": TARGET_VS_ONE_AT_A_TIME,
            "met": vs_one >= TARGET_VS_ONE_AT_A_TIME,
        },
        "vs_static": {"reached": vs_static, "target": TARGET_VS_STATIC, "met": vs_static >= TARGET_VS_STATIC},
    }
    return [
        f"target, concurrency {TARGET_CONCURRENCY}, tokens/s vs one at a time: {vs_one:.2f}x "
        f"(target >= {TARGET_VS_ONE_AT_A_TIME}x): {'met' if results['vs_one_at_a_time']['met'] else 'NOT met'}",
        f"target, concurrency {TARGET_CONCURRENCY}, tokens/s vs static batches of {STATIC_BATCH}: {vs_static:.2f}x "
        f"(target >= {TARGET_VS_STATIC}x): {'met' if results['vs_static']['met'] else 'NOT met'}",
    ], results


def machine_line() -> str:
    return (
        f"Machine: {cpu_name()}, {os.cpu_count()} cores; jax {installed_version('jax')} on {jax.default_backend()}, "
        "float32; one timed run per row, everything compiled beforehand"
    )


def probe_line(rows: list[Row]) -> str:
    probes = [row.probe_tokens_per_second for row in rows]
    return (
        f"probe: generate at batch 1, {PROBE_PROMPT_TOKENS}-token prompt, {PROBE_NEW_TOKENS} new tokens, right "
        f"before each row: {min(probes):.1f}..{max(probes):.1f} tokens/s, a spread of "
        f"{max(probes) / min(probes) - 1:.0%}; rows run at different machine speeds compare only to about that"
    )


def concurrency_list(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of integers >= 1")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/serve.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=DEFAULT_REQUESTS, help="requests in the list")
    parser.add_argument(
        "--concurrency",
        type=concurrency_list,
        default=list(DEFAULT_CONCURRENCY),
        help="engine concurrencies (client threads = engine slots), comma-separated",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the request list")
    parser.add_argument(
        "--decode-steps", type=int, default=DEFAULT_DECODE_STEPS, help="the engine's tokens per slot between rounds"
    )
    parser.add_argument("--json", default=None, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    if args.requests < 1:
        raise SystemExit("serve: --requests must be >= 1")
    model = bench_model()
    requests = make_requests(args.requests, args.seed)
    max_length = max(prompt_bucket(len(request.prompt)) + request.max_new_tokens for request in requests)
    log(
        f"{len(requests)} requests: prompts of {min(len(r.prompt) for r in requests)}.."
        f"{max(len(r.prompt) for r in requests)} tokens, {sum(r.max_new_tokens for r in requests)} tokens to generate"
    )

    log("generate: compiling")
    warm_generate(model, one_at_a_time_calls(requests) + static_calls(requests, model.text_config.pad_id))
    speed_probe(model)  # compiles the probe
    log("generate: one at a time")
    one_at_a_time, references = run_one_at_a_time(model, requests)
    log(f"generate: static batches of {STATIC_BATCH}")
    static, static_answers = run_static(model, requests)

    engine_rows, failures = {}, []
    for concurrency in args.concurrency:
        row, completions = run_engine(model, requests, concurrency, max_length, args.decode_steps)
        engine_rows[concurrency] = row
        failures += [
            f"concurrency {concurrency}: {line}"
            for line in mismatches(requests, references, [c.tokens for c in completions])
        ]
        log(f"engine, concurrency {concurrency}: {row.tokens_per_second:.1f} tokens/s")

    rows = [one_at_a_time, static, *engine_rows.values()]
    targets_text, targets = target_lines(engine_rows, one_at_a_time, static)
    static_agree = len(requests) - len(mismatches(requests, references, static_answers))
    total = time.perf_counter() - STARTED
    report = [
        machine_line(),
        "",
        f"{len(requests)} requests (seed {args.seed}): prompts of {PROMPT_LENGTHS[0]}..{PROMPT_LENGTHS[1]} tokens, "
        f"max_new_tokens from {ANSWER_LENGTHS}, greedy, no stop strings: {one_at_a_time.useful_tokens} tokens in all. "
        f"Engine: max_batch = concurrency, max_length {max_length}, decode_steps {args.decode_steps}.",
        "",
        table(rows, one_at_a_time, static),
        "",
        *targets_text,
        f"static batches of {STATIC_BATCH} generate {static.generated_tokens} tokens for {static.useful_tokens} useful "
        f"ones; their answers equal one-at-a-time generate's for {static_agree} of {len(requests)} requests "
        "(batched float arithmetic may differ)",
        "TTFT: submit to first token (prefill included, queueing too); ITL: gap between later tokens; "
        "tokens/s: useful tokens over the wall time of the whole list; mean in flight: requests in the engine "
        "on average (below the concurrency while the clients start and once the list runs out)",
        probe_line(rows),
        "CPU share of other processes while each row ran: "
        + ", ".join(f"{row.name} {row.other_processes_cpu_share:.0%}" for row in rows),
    ]
    if failures:
        report += ["", f"FAILED: {len(failures)} engine answers differ from one-at-a-time generate():", *failures]
    else:
        report.append(
            f"correctness: every engine answer equals one-at-a-time generate()'s ({len(engine_rows)} "
            f"concurrencies x {len(requests)} requests)"
        )
    report.append(f"total benchmark time: {total:.0f} s")
    print("\n".join(report))

    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(
                    settings=dict(
                        requests=len(requests),
                        seed=args.seed,
                        concurrency=args.concurrency,
                        decode_steps=args.decode_steps,
                        max_length=max_length,
                        static_batch=STATIC_BATCH,
                        prompt_lengths=[len(r.prompt) for r in requests],
                        max_new_tokens=[r.max_new_tokens for r in requests],
                        jax=installed_version("jax"),
                        cpu_count=os.cpu_count(),
                    ),
                    rows=[
                        dict(
                            dataclasses.asdict(row),
                            tokens_per_second=row.tokens_per_second,
                            requests_per_second=row.requests_per_second,
                            vs_one_at_a_time=row.tokens_per_second / one_at_a_time.tokens_per_second,
                            vs_static=row.tokens_per_second / static.tokens_per_second,
                        )
                        for row in rows
                    ],
                    targets=targets,
                    static_answers_equal=static_agree,
                    failures=failures,
                    total_seconds=total,
                ),
                f,
                indent=1,
            )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
