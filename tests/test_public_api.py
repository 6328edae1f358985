import subprocess
import sys

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


def test_kernels_only_importable_under_package(tmp_path):
    # Run outside the repository so the source tree itself is not on sys.path.
    code = ("import importlib.util as u, sys; "
            "sys.exit(0 if u.find_spec('energy_attn.kernels') and not u.find_spec('kernels') "
            "else 1)")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True)
    assert res.returncode == 0
