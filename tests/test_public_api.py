import subprocess
import sys
from pathlib import Path

import pytest

import energy_attn

EXPECTED = {
    "OPTIMIZERS",
    "EnergyBasedAttention",
    "EnergyMultiheadAttention",
    "VanillaSoftmaxAttention",
    "elastic_energy",
    "elastic_energy_grad",
    "hopfield_descent",
    "hopfield_energy",
    "hopfield_energy_grad",
    "minimize_energy",
    # optimizer zoo: blocks, GPT, linear energies
    "GPT",
    "GPTConfig",
    "LightMHA2nd1st",
    "LinearAttention",
    "MHA",
    "MHA2nd1st",
    "MomenMHA",
    "MultiHeadSelfAttention",
    "NagMHA",
    "OptimizerBlock",
    "gated_linear_energy",
    "linear_attention",
    "linear_energy",
    "Hopfield",
    "HopfieldLayer",
    "HopfieldPooling",
    "EnergyTransformerAttention",
    "energy_transformer_energy",
    "energy_transformer_energy_grad",
    "swap_attention",
    # training experiments: the attention-informed optimizer
    "AttentionInformedAdam",
}


def test_all_is_pinned():
    assert set(energy_attn.__all__) == EXPECTED
    for name in energy_attn.__all__:
        assert hasattr(energy_attn, name), name


def test_import_is_light():
    code = ("import sys, energy_attn; heavy = [m for m in ('matplotlib', 'transformers', "
            "'triton') if m in sys.modules]; print(heavy); sys.exit(bool(heavy))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("where", ["outside", "repository root"])
def test_kernels_only_importable_under_package(tmp_path, where):
    """The kernels import as ``energy_attn.kernels`` only. The top-level import name ``kernels``
    belongs to a PyPI distribution (Hugging Face's kernel hub, which transformers imports):
    whether or not it is installed, it must never resolve to this repository, not even from the
    repository root, whose directory ``python -m``/``python -c`` put first on sys.path."""
    root = Path(__file__).resolve().parents[1]
    code = ("import importlib.util as u, sys; s = u.find_spec('kernels'); "
            "print(s and (s.origin or list(s.submodule_search_locations)[0])); "
            "sys.exit(0 if u.find_spec('energy_attn.kernels') else 1)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path if where == "outside" else root)
    assert res.returncode == 0, res.stderr
    found = res.stdout.strip()
    if found != "None":  # another distribution's (installed, possibly in a venv in the tree)
        pkg = Path(found).resolve()
        pkg = pkg.parent if pkg.name == "__init__.py" else pkg
        assert pkg.parent != root and not pkg.is_relative_to(root / "energy_attn_kernels"), pkg
