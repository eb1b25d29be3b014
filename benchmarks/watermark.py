"""WAFFLE watermarking on digits: its cost in clean accuracy, and whether verification
tells the watermarked model, an independently trained one and a thief's fine-tuned copy
apart. It measures what the README's "Watermarking" section quotes.

For every seed and partition it runs the default digits experiment (20 clients, FedAvg,
30 rounds) twice with the same seed, without and with ``watermark.enabled``, and then
verifies (exact binomial test, alpha 1e-6; what ``fedloom watermark verify`` does):

- the watermarked model against its own trigger set (must be accepted),
- the model of the run without a watermark against that trigger set (must be rejected),
- a thief's copy: the watermarked model fine-tuned on a random 10 % of the pooled
  training data for 5 epochs (:func:`fedloom.attacks.theft.fine_tune_stolen`), once with
  the clients' own SGD settings (lr 0.1, momentum 0.9) and once more gently (lr 0.01).

    .venv/bin/python benchmarks/watermark.py [--rounds 30] [--seeds 0,1,2]
        [--partitions dirichlet,iid] [--json watermark.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedloom.attacks.theft import Theft, fine_tune_stolen
from fedloom.config import RunConfig, load_config
from fedloom.data import build_federated_dataset
from fedloom.engine.simulation import run_simulation
from fedloom.server.watermark import WATERMARK_FILE, TriggerSet, verify
from fedloom.store import RunStore
from fedloom.strategies import build_learner

ALPHA = 1e-6
THEFTS = {"thief lr 0.1": Theft(lr=0.1), "thief lr 0.01": Theft(lr=0.01)}


def final_model(run_dir: Path) -> np.ndarray:
    with RunStore.open(run_dir) as store:
        ckpt = store.latest_checkpoint()
    assert ckpt is not None
    return ckpt.tensors["global"]


def run_pair(cfg: RunConfig, root: Path) -> dict[str, Any]:
    """The clean and the watermarked run of ``cfg``, and every verification."""
    clean_dir, wm_dir = root / "clean", root / "watermarked"
    clean = run_simulation(cfg, clean_dir)
    wm_cfg = cfg.model_copy(deep=True)
    wm_cfg.watermark.enabled = True
    started = time.perf_counter()
    marked = run_simulation(wm_cfg, wm_dir)
    trigger = TriggerSet.load(wm_dir / WATERMARK_FILE)
    data = build_federated_dataset(cfg.data, cfg.seed)
    learner = build_learner(cfg, data)
    pooled = data.pooled_train()
    models = {"watermarked": final_model(wm_dir), "independent": final_model(clean_dir)}
    for name, theft in THEFTS.items():
        models[name] = fine_tune_stolen(learner, models["watermarked"], pooled, theft)
    rows = {}
    for name, weights in models.items():
        verdict = verify(learner, weights, trigger, alpha=ALPHA)
        rows[name] = {
            "clean_accuracy": learner.evaluate(weights, data.test)["accuracy"],
            "trigger_accuracy": verdict.accuracy,
            "p_value": verdict.p_value,
            "carries_watermark": verdict.carries_watermark,
        }
    steps = [r.get("watermark_steps", 0) for r in marked["history"]]
    return {
        "clean_run_accuracy": clean["final"]["accuracy"],
        "watermarked_run_accuracy": marked["final"]["accuracy"],
        "cost_points": 100 * (clean["final"]["accuracy"] - marked["final"]["accuracy"]),
        "watermarked_wall_s": time.perf_counter() - started,
        "clean_wall_s": clean["wall_s"],
        "server_steps_total": int(sum(steps)),
        "models": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--partitions", default="dirichlet,iid")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results: list[dict[str, Any]] = []
    for partition in args.partitions.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            cfg = load_config(
                None, [f"rounds={args.rounds}", f"seed={seed}", f"data.partition='{partition}'"]
            )
            with tempfile.TemporaryDirectory() as tmp:
                result = run_pair(cfg, Path(tmp))
            result.update(partition=partition, seed=seed)
            results.append(result)
            print(
                f"{partition} seed {seed}: clean {result['clean_run_accuracy']:.4f}, "
                f"watermarked {result['watermarked_run_accuracy']:.4f} "
                f"(cost {result['cost_points']:+.2f} points)",
                flush=True,
            )
    print()
    print(
        f"| partition | seed | model | clean acc. | trigger acc. | p-value | "
        f"verdict (alpha {ALPHA:g}) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        for name, m in r["models"].items():
            verdict = "watermark" if m["carries_watermark"] else "no watermark"
            print(
                f"| {r['partition']} | {r['seed']} | {name} | {m['clean_accuracy']:.4f} | "
                f"{m['trigger_accuracy']:.2f} | {m['p_value']:.2g} | {verdict} |"
            )
    print()
    print("| partition | mean clean acc. without | with watermark | mean cost (points) |")
    print("|---|---|---|---|")
    for partition in args.partitions.split(","):
        rs = [r for r in results if r["partition"] == partition]
        without = float(np.mean([r["clean_run_accuracy"] for r in rs]))
        with_wm = float(np.mean([r["watermarked_run_accuracy"] for r in rs]))
        print(f"| {partition} | {without:.4f} | {with_wm:.4f} | {100 * (without - with_wm):+.2f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
