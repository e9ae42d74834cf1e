"""`reparam delta extract|apply|remove|info` on tiny models written to tmp_path, run in-process."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from reparam.cli.main import main

KEYS = ["encoder.layer.0.dense.weight", "encoder.layer.0.dense.bias", "encoder.layer.1.dense.weight",
        "encoder.layer.1.dense.bias", "classifier.weight"]


def write_model(folder: Path, tensors: dict) -> Path:
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
    return folder


@pytest.fixture
def models(tmp_path):
    g = torch.Generator().manual_seed(0)
    shapes = {KEYS[0]: (6, 4), KEYS[1]: (6,), KEYS[2]: (6, 6), KEYS[3]: (6,), KEYS[4]: (2, 6)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    base["position_ids"] = torch.arange(4)
    ft = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in base.items()}
    return base, ft, write_model(tmp_path / "base", base), write_model(tmp_path / "ft", ft)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str, message: str):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("reparam: error: ") and message in lines[0], err


@pytest.mark.parametrize("argv", [["delta"], ["delta", "extract"], ["delta", "apply"], ["delta", "remove"],
                                  ["delta", "info"]])
def test_help(capsys, argv):
    code, out, _ = run(capsys, *argv, "--help")
    assert code == 0 and out.startswith(f"usage: reparam {' '.join(argv)}")


def test_round_trip(tmp_path, capsys, models):
    base, ft, bpath, fpath = models
    delta = tmp_path / "tv.safetensors"
    code, out, _ = run(capsys, "delta", "extract", "--base", bpath, "--finetuned", fpath, "-o", delta,
                       "--layers", "1,classifier", "--no-progress")
    assert code == 0 and "task vector of 3 tensor(s), 54 parameters" in out
    code, out, _ = run(capsys, "delta", "info", delta)
    assert code == 0 and "layers: 1, classifier" in out and "encoder.layer.1.dense.weight  6x6  F32" in out
    assert "tensors: 3; parameters: 54" in out and f"base: {bpath}" in out
    code, out, _ = run(capsys, "delta", "apply", "--model", bpath, "--delta", delta, "-o", tmp_path / "patched",
                       "--no-progress")
    assert code == 0 and "model written to" in out
    patched = load_file(str(tmp_path / "patched" / "model.safetensors"))
    assert (tmp_path / "patched" / "config.json").is_file()
    for k in base:
        want = ft[k] if k in ("encoder.layer.1.dense.weight", "encoder.layer.1.dense.bias", "classifier.weight") \
            else base[k]
        assert torch.equal(patched[k], want), k
    for action in (["remove"], ["apply", "--scale", "-1"]):
        out_dir = tmp_path / f"back-{action[0]}"
        code, _, err = run(capsys, "delta", *action, "--model", tmp_path / "patched", "--delta", delta, "-o",
                           out_dir, "--no-progress")
        assert code == 0, err
        back = load_file(str(out_dir / "model.safetensors"))
        for k in base:
            torch.testing.assert_close(back[k], base[k], rtol=0, atol=1e-6)


def test_signature_and_quantisation(tmp_path, capsys, models):
    base, ft, bpath, fpath = models
    clean = write_model(tmp_path / "clean", {k: v + 0.01 if v.is_floating_point() else v for k, v in base.items()})
    sig = tmp_path / "sig"
    code, out, _ = run(capsys, "delta", "extract", "--base", bpath, "--finetuned", fpath, "--clean", clean,
                       "-o", sig, "--exclude", "classifier", "--quantize", "16", "--no-progress")
    assert code == 0 and "weight signature of 4 tensor(s)" in out
    code, out, _ = run(capsys, "delta", "info", sig, "--brief")
    assert code == 0 and "quantization: linear, 16 levels" in out and "excluding classifier" in out
    assert "dense.weight  6x4" not in out  # --brief
    code, _, err = run(capsys, "delta", "apply", "--model", clean, "--delta", sig, sig, "--scale", "0.5", "0.5",
                       "-o", tmp_path / "patched", "--no-progress")
    assert code == 0, err


def test_errors_are_one_line(tmp_path, capsys, models):
    base, ft, bpath, fpath = models
    delta = tmp_path / "tv.safetensors"
    assert run(capsys, "delta", "extract", "--base", bpath, "--finetuned", fpath, "-o", delta, "--no-progress")[0] == 0
    other = dict(base, **{KEYS[2]: torch.zeros(6, 5)})
    opath = write_model(tmp_path / "other", other)
    code, _, err = run(capsys, "delta", "apply", "--model", opath, "--delta", delta, "-o", tmp_path / "o")
    assert code == 2
    one_error_line(err, "the delta(s) do not fit")  # details on the following lines of the exception
    assert not (tmp_path / "o").exists()
    changed = write_model(tmp_path / "changed", dict(base, **{KEYS[0]: base[KEYS[0]] * 2}))
    code, _, err = run(capsys, "delta", "apply", "--model", changed, "--delta", delta, "-o", tmp_path / "o",
                       "--no-progress")
    assert code == 2
    one_error_line(err, f"tensor '{KEYS[0]}' is not from the models the delta")
    assert "--force" in err and not (tmp_path / "o").exists()
    code, _, err = run(capsys, "delta", "apply", "--model", changed, "--delta", delta, "-o", tmp_path / "o",
                       "--force", "--no-progress")
    assert code == 0 and (tmp_path / "o" / "model.safetensors").is_file()
    for argv, message in [
        (["delta", "info", tmp_path / "missing.safetensors"], "no such file"),
        (["delta", "info", bpath / "model.safetensors"], "not a reparam delta"),
        (["delta", "extract", "--base", bpath, "--finetuned", fpath, "-o", tmp_path / "x", "--layers", "9"],
         "layers item '9' matches no floating-point tensor"),
        (["delta", "extract", "--base", bpath, "--finetuned", fpath, "-o", tmp_path / "x", "--quantize", "1"],
         "quantize must be"),
        (["delta", "apply", "--model", bpath, "--delta", delta, "-o", tmp_path / "o"], "exists"),
    ]:
        code, _, err = run(capsys, *argv)
        assert code == 2
        one_error_line(err, message)
    code, _, err = run(capsys, "delta", "apply", "--model", bpath, "-o", tmp_path / "y")  # argparse
    assert code == 2 and err.strip().splitlines()[-1].startswith("reparam delta apply: error:")
