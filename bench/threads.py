"""Benchmark: torch thread settings (``scorer.threads``, issue 17 point 2), in alternating paired runs.

Each configuration runs in a fresh process (OpenMP reads its settings when torch is imported):

- ``default``: what the project did before: no thread setting, OpenMP's default wait policy
  (torch uses one thread per core);
- ``N passive``: ``scorer.threads = N`` applied by :mod:`scorer.threads` (``OMP_WAIT_POLICY=PASSIVE``).

and measures, per configuration and round,

- ``score``: one-at-a-time scoring, the daemon's usual case: 20 face crops of
  ``../shared/data/animeface-10/test`` scored one call each by the untrained default model
  (EfficientNet-Lite0 features of the crop and the picture, the ResNet-18 network, flip TTA):
  wall and CPU milliseconds per call (CPU counts every thread, spinning included);
- ``train`` (``--train``): one epoch of ``fit()``'s loop on the animeface-10 training crops
  (``bench/fullfit.py --no-fit --profile 1``): wall and CPU seconds.

    python bench/threads.py --rounds 2 --train
    python bench/threads.py --configs default,1,2 --rounds 3

Compare configurations within a round only when other jobs share the machine; record ``uptime``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TASTEFEED_SHARED", ROOT.parent / "shared")) / "data" / "animeface-10"
OMP_KEYS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")


def child(kind: str, config: str) -> dict:
    """Run one measurement in this process, configured as ``config`` says."""
    sys.path.insert(0, str(ROOT))
    if config != "default":
        from scorer import threads

        threads.apply(int(config))
    import torch

    out = {"config": config, "kind": kind, "torch_threads": torch.get_num_threads(),
           "wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset")}
    if kind == "score":
        from PIL import Image

        from scorer.registry import untrained_scorer
        from scorer.settings import ScorerConfig

        scorer = untrained_scorer(ScorerConfig(device="cpu"), margin=0.2)
        crops = [Image.open(p).convert("RGB") for p in sorted((DATA / "test").rglob("*.*g"))[:20]]
        scorer.predict(crops[:1], crops[:1])  # warm up
        wall, cpu = time.perf_counter(), time.process_time()
        for crop in crops:
            scorer.predict([crop], [crop])
        n = len(crops)
        out.update(n=n, wall_ms=round((time.perf_counter() - wall) / n * 1000, 1),
                   cpu_ms=round((time.process_time() - cpu) / n * 1000, 1))
    else:
        sys.path.insert(0, str(ROOT / "bench"))
        import fullfit
        import numpy as np

        from scorer.dataset import split_of
        from scorer.model import build_model
        from scorer.settings import ScorerConfig, TrainConfig

        fullfit.DATA = DATA
        tcfg, scfg = TrainConfig(), ScorerConfig()
        x, y, keys = fullfit.load("train", scfg.image_size)
        val = np.array([split_of(k, tcfg.val_share) == "val" for k in keys])
        torch.manual_seed(0)
        net = build_model(scfg.arch)
        cpu = time.process_time()
        parts = fullfit.profile(net, x[~val], y[~val], x[val], y[val], tcfg, 1)
        out.update(n=int((~val).sum()), epoch_s=parts["epoch"], cpu_s=round(time.process_time() - cpu, 1))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="default,2,1", help="comma-separated: default and/or thread counts")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--train", action="store_true", help="also time one training epoch per configuration")
    p.add_argument("--child", nargs=2, metavar=("KIND", "CONFIG"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)), flush=True)
        return 0
    if not DATA.exists():
        print(f"{DATA} not present: nothing to benchmark (TASTEFEED_SHARED names the shared folder)",
              file=sys.stderr)
        return 0
    configs = args.configs.split(",")
    kinds = ["score"] + (["train"] if args.train else [])
    print(f"{os.cpu_count()} cores; load {os.getloadavg()[0]:.2f}", flush=True)
    for r in range(args.rounds):
        order = configs if r % 2 == 0 else configs[::-1]   # alternate, so that drift in the load evens out
        for kind in kinds:
            for config in order:
                env = {k: v for k, v in os.environ.items() if k not in OMP_KEYS}
                run = subprocess.run([sys.executable, __file__, "--child", kind, config], env=env,
                                     capture_output=True, text=True, check=True)
                result = json.loads(run.stdout.strip().splitlines()[-1])
                result.update(round=r + 1, load=round(os.getloadavg()[0], 2))
                print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
