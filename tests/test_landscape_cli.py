import subprocess
import sys

from energy_attn.cli import main


def test_landscape_writes_non_empty_pngs(tmp_path, capsys):
    out = tmp_path / "figs"
    assert main(["landscape", "--out", str(out), "--seed", "1"]) == 0
    captured = capsys.readouterr()
    printed = captured.out.split()
    files = sorted(out.iterdir())
    assert sorted(str(f) for f in files) == sorted(printed)
    names = {f.name for f in files}
    assert {"flatland_big_step.png", "flatland_low_temperature.png",
            "flatland_self_attention.png", "flatland_qkv.png", "norm_sweep.png"} <= names
    for f in files:
        data = f.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5_000, f
    assert "norm sweep" in captured.err and f"{len(files) + 11}/" in captured.err


def test_importing_the_package_never_imports_matplotlib():
    code = (
        "import sys, energy_attn, energy_attn.viz, energy_attn.cli\n"
        "energy_attn.cli.build_parser()\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)



def test_landscape_out_that_is_a_file_is_a_clean_error(tmp_path, capsys):
    # used to draw first, then fail with a FileExistsError traceback
    (tmp_path / "afile").write_text("")
    for out in ("afile", "afile/figs"):
        assert main(["landscape", "--out", str(tmp_path / out)]) == 2
        err = capsys.readouterr().err
        assert "error: --out" in err and "is a file, not a directory" in err
