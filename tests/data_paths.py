"""Where tests find the two shipped Prometheus files (vicuna_eval.json, mt_bench_eval.json).

``REAL_PROMETHEUS_DATA`` (a folder) wins; else ``../shared/data/prometheus/`` beside the checkout.  Tests
that need them skip with a message that says how to get them.
"""
import os
from pathlib import Path

import pytest

ENV_VAR = "REAL_PROMETHEUS_DATA"
PROMETHEUS_DATA = Path(os.environ.get(ENV_VAR) or Path(__file__).resolve().parents[1].parent / "shared" / "data"
                       / "prometheus")
VICUNA, MT_BENCH = PROMETHEUS_DATA / "vicuna_eval.json", PROMETHEUS_DATA / "mt_bench_eval.json"
SHIPPED = [VICUNA, MT_BENCH]
HOW_TO_GET = (f"the Prometheus benchmark files are not in {PROMETHEUS_DATA}: run `real data download vicuna DIR` "
              f"and `real data download mt-bench DIR` on a machine with a network, then set {ENV_VAR}=DIR")
needs_shipped = pytest.mark.skipif(not all(p.exists() for p in SHIPPED), reason=HOW_TO_GET)
