"""The README's AttentionInformedAdam example trains on every seed (docs/math.md §6).

The example is taken from README.md itself (the ```python block that builds the optimizer), so
the documented code is the tested code. With the seed's literal normalisation
(``attention_norm="loss"``) it blows up on 6 of seeds 0-7 within the 20 steps (seeds 0, 1, 4,
5, 6 by step 3, loss 5.6 -> 6e4-6e5 or NaN; seed 2 at step 12; AMD EPYC, 2 cores, torch
2.13.0+cpu); the default ``"own"`` must train on all 8.
"""

import math
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
SEED_LINE = "torch.manual_seed(0)"


def readme_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    found = [b for b in blocks if "AttentionInformedAdam(" in b]
    assert len(found) == 1, "README.md must hold one AttentionInformedAdam example"
    assert found[0].count(SEED_LINE) == 1
    return found[0]


def run(seed: int, **replace) -> list[float]:
    code = readme_example().replace(SEED_LINE, f"torch.manual_seed({seed})")
    for old, new in replace.items():
        assert code.count(old) == 1
        code = code.replace(old, new)
    ns: dict = {}
    exec(compile(code, f"README.md[aiadam example, seed {seed}]", "exec"), ns)
    return ns["losses"]


def test_readme_example_uses_the_readme_settings():
    code = readme_example()
    for setting in ("n_layer=2", "n_head=4", "d_model=64", "lr=3e-3", "gamma=1.0",
                    "energy_source=model", "(2, 8, 64)", "range(20)"):
        assert setting in code, setting


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(8))
def test_readme_example_trains_on_every_seed(seed):
    losses = run(seed)
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses), losses
    assert max(losses[1:]) < losses[0], losses  # never above the start
    assert losses[-1] < losses[0] - 0.5, losses  # and clearly falling (measured: ~1.5 nats)
