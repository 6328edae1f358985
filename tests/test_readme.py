"""Every ```python block of the README runs as written (docs that match the code)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert BLOCKS


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {})


def test_readme_low_temperature_valleys():
    # The README's low-temperature caption: at beta = 10/sqrt(2) only outer stored patterns are
    # minima (it used to say each pattern digs its own valley). Descent started at each of the
    # 32 patterns stays at 4 of them, all corners of their convex hull.
    import torch

    from energy_attn.viz import toy_patterns

    _, stored = toy_patterns(seed=0)
    keys = stored[0].double()
    x = keys.clone()
    for _ in range(2000):  # the energy descent with step 1: x <- softmax(beta x K^T) K
        x = torch.softmax(10 * 2**-0.5 * x @ keys.T, -1) @ keys
    stays = (x - keys).norm(dim=-1) < 0.02
    angles = torch.linspace(0, 2 * torch.pi, 3600, dtype=torch.float64)
    corner = torch.zeros(len(keys), dtype=torch.bool)
    corner[(keys @ torch.stack([angles.cos(), angles.sin()], -1).T).argmax(0)] = True
    assert int(stays.sum()) == 4 and bool((corner | ~stays).all())
    assert "(4 of the 32, corners of their convex hull" in README.read_text()
