"""Benchmark (not a test): how much a course process slows down beside another busy process, before and after
the thread settings of ``rlcourse.threads``. Prints a table and writes it to build/bench/sharing.md.

    python -m rlcourse.sharing_bench [--workloads step generate] [--reps 3]

Each cell is a fresh process (so the OpenMP settings apply from its start) timing ``reps`` repetitions of one
workload after a warm-up: ``step``, one forward + backward of the 4-bit LoRA policy on 8 × 96 tokens; ``generate``,
4 prompts × 8 samples × 16 new tokens. Beside it, the neighbour is any other PyTorch program at its defaults
(matmuls in a loop, one thread per core, OpenMP's default spin-waiting): a second notebook, a test run, or the
same course started twice. The neighbour is started before the workload and stopped after it.

Rows: "before" runs with no OpenMP settings of ours (libgomp's default waiting, the course before
``rlcourse.threads``), "after" with the environment ``rlcourse.threads.environment()`` gives a course process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from rlcourse.paths import build_dir

OMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")


def _workload(name: str, reps: int) -> list[float]:
    import torch

    from rlcourse.models import LoraSettings, load_model, load_tokenizer

    tok = load_tokenizer()
    model = load_model(lora=LoraSettings(), seed=0)
    if name == "step":
        ids = torch.randint(100, 20000, (8, 96), generator=torch.Generator().manual_seed(0))

        def once():
            model(input_ids=ids, labels=ids).loss.backward()
            model.zero_grad(set_to_none=True)
    else:
        from rlcourse.sampling import prompt_text

        questions = ["Why is the sky blue?", "Name a planet.", "What is 2 + 2?", "Say hi."]
        tok.padding_side = "left"
        enc = tok([prompt_text(tok, [{"role": "user", "content": q}]) for q in questions], return_tensors="pt",
                  padding=True, add_special_tokens=False)

        def once():
            torch.manual_seed(0)
            with torch.no_grad():
                model.generate(**enc, do_sample=True, top_k=0, max_new_tokens=16, min_new_tokens=16,
                               num_return_sequences=8, pad_token_id=tok.pad_token_id)
    once()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return times


_NEIGHBOUR = """
import torch
a, b = torch.randn(512, 512), torch.randn(512, 512)
while True:
    a @ b
"""


def _env(after: bool, candidate: dict | None = None) -> dict:
    from rlcourse.threads import environment

    env = {k: v for k, v in os.environ.items() if k not in OMP_VARIABLES}
    env["RLCOURSE_THREADS"] = "off"  # the child's own `import rlcourse` must not set them
    return env | ((candidate if candidate is not None else environment()) if after else {})


def measure(workload: str, after: bool, beside: bool, reps: int, candidate: dict | None = None) -> float:
    """Median seconds of ``workload`` in a fresh process, alone or beside a busy neighbour."""
    neighbour = None
    if beside:
        plain = {k: v for k, v in os.environ.items() if k not in OMP_VARIABLES}
        plain["RLCOURSE_THREADS"] = "off"
        neighbour = subprocess.Popen([sys.executable, "-c", _NEIGHBOUR], env=plain)
        time.sleep(2)  # let it get going
    try:
        out = subprocess.run([sys.executable, "-m", "rlcourse.sharing_bench", "--child", workload, "--reps", str(reps)],
                             env=_env(after, candidate), capture_output=True, text=True, check=True).stdout
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    return statistics.median(json.loads(out.strip().splitlines()[-1]))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=["step", "generate"], choices=["step", "generate"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--after", nargs="+", metavar="NAME=VALUE",
                        help="try other settings as 'after' (e.g. GOMP_SPINCOUNT=30000) instead of rlcourse.threads'")
    parser.add_argument("--child", choices=["step", "generate"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_workload(args.child, args.reps)))
        return []
    from rlcourse.precision import current
    from rlcourse.threads import environment

    candidate = dict(pair.split("=", 1) for pair in args.after) if args.after else None
    settings = candidate or environment()
    rows = []
    for workload in args.workloads:
        for after in (False, True):
            idle = measure(workload, after, beside=False, reps=args.reps, candidate=candidate)
            busy = measure(workload, after, beside=True, reps=args.reps, candidate=candidate)
            rows.append({"workload": workload, "settings": "after" if after else "before", "idle_s": idle,
                         "beside_busy_s": busy, "slowdown": busy / idle})
            print(rows[-1], flush=True)
    precision = current()
    lines = [f"CPU sharing on {precision.hardware}, {precision.name}; after = {settings}", "",
             "| workload | settings | idle (s) | beside a busy process (s) | slowdown |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['workload']} | {r['settings']} | {r['idle_s']:.2f} | {r['beside_busy_s']:.2f} | "
              f"{r['slowdown']:.1f}× |" for r in rows]
    text = "\n".join(lines)
    print(text)
    out = build_dir("bench")
    (out / "sharing.md").write_text(text + "\n")
    (out / "sharing.json").write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
