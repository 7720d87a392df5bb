"""`qlora serve` under load: completion tokens/s and latency at several concurrencies, beside `qlora generate`.

    python scripts/bench_serve.py                        # trains a tiny 4-bit adapter first (CPU, ~3 min in all)
    python scripts/bench_serve.py --adapter runs/guanaco --requests 64 --max-tokens 128 --concurrency 1 8 32

The same prompts go to one server at each concurrency (requests in flight at once), greedy, through the
`openai` client; tokens are those of the returned texts. `qlora generate` runs the same prompts in-process
with the same adapter, one at a time and in batches. Markdown on stdout; --json writes everything.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchlib import markdown_table, write_json

from qlora_cli.adapter import read_adapter
from qlora_cli.model import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
WORDS = "apple river stone cloud tiger green music paper light house ocean bread chair dream flame glass".split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", type=Path, help="A trained adapter; default: train a tiny one first.")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        adapter = args.adapter or tiny_adapter(Path(scratch) / "adapter")
        prompts = [f"Repeat the words. {WORDS[i % 16]} {WORDS[(3 * i + 1) % 16]} {WORDS[(5 * i + 2) % 16]}"
                   for i in range(args.requests)]  # fmt: skip
        rows, results = [], {}
        tokenizer = load_tokenizer(read_adapter(adapter).base_model())
        server, url = start_server(adapter, max(args.concurrency), args.max_tokens)
        try:
            served = read_json(f"{url}/v1/models")["data"][0]["id"]
            for concurrency in args.concurrency:
                results[f"serve c={concurrency}"] = load(url, served, prompts, concurrency, args.max_tokens, tokenizer)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=120)
        for batch_size in sorted({1, max(args.concurrency)}):
            results[f"generate batch={batch_size}"] = generate(adapter, prompts, batch_size, args.max_tokens)

    base = results[f"serve c={args.concurrency[0]}"]["tokens_per_s"]
    for name, r in results.items():
        rows.append([name, r["requests"], r["tokens"], round(r["seconds"], 1), round(r["tokens_per_s"], 1),
                     r.get("p50_s", "-"), r.get("p95_s", "-"), f"{r['tokens_per_s'] / base:.2f}x"])  # fmt: skip
    print(f"Adapter {adapter}; {args.requests} prompts, greedy, at most {args.max_tokens} new tokens; "
          f"torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}\n")  # fmt: skip
    headers = ["setup", "requests", "completion tokens", "wall s", "tokens/s", "p50 latency s", "p95 latency s",
               f"vs serve c={args.concurrency[0]}"]  # fmt: skip
    print(markdown_table(headers, rows))
    write_json(args.json, results)


def tiny_adapter(out: Path) -> Path:
    """builtin:tiny-llama, 4-bit NF4, a LoRA adapter of two gentle steps: it rarely ends a reply early, so every
    request generates about max_tokens and the figures measure generation, not HTTP round trips."""
    subprocess.run(
        [sys.executable, "-m", "qlora_cli", "train", "--config", str(REPO / "configs/demo.yaml"), f"output_dir={out}",
         "training.max_steps=2", "training.learning_rate=3e-4", "training.save_steps=100", "data.eval_size=8",
         "eval.exact_match_samples=0"],
        check=True, cwd=REPO, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return out


def start_server(adapter: Path, max_batch_size: int, max_tokens: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "qlora_cli", "serve", "--adapter", str(adapter), "--port", str(port),
               "--max-batch-size", str(max_batch_size), "--max-tokens", str(max_tokens)]  # fmt: skip
    server = subprocess.Popen(command, cwd=REPO, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            read_json(f"{url}/health")
            return server, url
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("the server did not start")


def read_json(url: str) -> dict:
    import json

    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def load(url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int, tokenizer) -> dict:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)

    def ask(prompt: str) -> tuple[str, float]:
        started = time.perf_counter()
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0
        )
        return reply.choices[0].message.content, time.perf_counter() - started

    ask(prompts[0])  # warm up
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(ask, prompts))
    seconds = time.perf_counter() - started
    latencies = sorted(latency for _, latency in answers)
    tokens = count_tokens([text for text, _ in answers], tokenizer)
    return {
        "requests": len(prompts), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
        "p50_s": round(statistics.median(latencies), 2),
        "p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 2),
    }  # fmt: skip


def generate(adapter: Path, prompts: list[str], batch_size: int, max_tokens: int) -> dict:
    """`qlora generate`'s own code on the same adapter, timed after loading."""
    from qlora_cli.generate import Sampling, load_generator

    generator = load_generator(None, adapter)
    sampling = Sampling(max_new_tokens=max_tokens, temperature=0.0, batch_size=batch_size)
    generator.generate([generator.format(prompts[0])], sampling)  # warm up
    started = time.perf_counter()
    texts = generator.generate([generator.format(p) for p in prompts], sampling)
    seconds = time.perf_counter() - started
    tokens = count_tokens(texts, generator.loaded.tokenizer)
    return {"requests": len(prompts), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def count_tokens(texts: list[str], tokenizer) -> int:
    return sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts)


if __name__ == "__main__":
    main()
