"""The `reparam` command line, run in-process through main([...]) (plus one real subprocess), and the bundled
sentiment data set. Small on purpose: tiny fine-tunes (2 steps, 16 rows), one thread."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import reparam
from reparam.cli.common import bundled_data_path
from reparam.cli.main import main

SUBCOMMANDS = ["finetune", "demo", "inspect", "export", "targets", "methods"]
TINY = ["--max-steps", "2", "--limit", "16", "--eval-limit", "16", "--max-length", "32", "--quiet"]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, minilm_path):
    out = tmp_path_factory.mktemp("cli") / "adapter"
    code = main(["finetune", "--model", str(minilm_path), "--r", "4", "--alpha", "8", "--set", "dropout=0.1",
                 "--output", str(out), *TINY])
    assert code == 0
    return out


# --- help and argument errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_of_each_subcommand(capsys, command):
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0
    assert out.startswith(f"usage: reparam {command}")


def test_console_script_help():
    script = Path(sys.executable).with_name("reparam")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "reparam.cli.main"]
    proc = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: reparam")
    for command in SUBCOMMANDS:
        assert command in proc.stdout


def test_no_command_is_a_usage_error(capsys):
    code, _, err = run_cli(capsys)
    assert code == 2 and "usage: reparam" in err


@pytest.mark.parametrize("argv, message", [
    (["finetune", "--method", "nosuchmethod", "-o", "unused"], "unknown method 'nosuchmethod'"),
    (["finetune", "--set", "nosuchfield=1", "-o", "unused"], "unknown field(s) 'nosuchfield'"),
    (["finetune", "--set", "novalue", "-o", "unused"], "expected key=value"),
    (["finetune", "--data", "/no/such/data/dir", "-o", "unused"], "/no/such/data/dir: no such file or folder"),
    (["finetune", "--model", "/no/such/model", "-o", "unused"], "no such model folder"),
    (["finetune", "--warmup-ratio", "5", "-o", "unused"], "warmup_ratio"),
    (["targets", "--targets", "nosuchmodule"], "'nosuchmodule' matched no module"),
    (["inspect", "/no/such/adapter"], "no such adapter directory"),
])
def test_bad_arguments_give_one_line_and_exit_2(capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("reparam: error: ") and message in lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", [["finetune", "--epochs", "-1", "-o", "x"], ["finetune"],
                                  ["export", "somewhere", "--format", "onnx", "-o", "x"], ["nosuchcommand"]])
def test_parse_errors_exit_2(capsys, argv):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("reparam")  # argparse: "reparam <cmd>: error: ..."


# --- targets, methods --------------------------------------------------------------------------------------

def test_targets_all_linear_on_bundled_model(capsys, minilm_path):
    code, out, _ = run_cli(capsys, "targets", "--model", str(minilm_path))
    assert code == 0
    lines = out.strip().splitlines()
    names = [line.split()[0] for line in lines[:-1]]
    # 6 layers x (query, key, value, attention.output.dense, intermediate.dense, output.dense) + pooler.dense;
    # the classifier head is left out of all-linear (it is trained in full instead).
    assert len(names) == 37 and lines[-1].startswith("37 module(s)")
    assert "bert.pooler.dense" in names and "classifier" not in names
    assert sum(n.endswith("attention.self.query") for n in names) == 6
    assert "Linear(1536x384)" in out


def test_targets_with_spec(capsys, minilm_path):
    code, out, _ = run_cli(capsys, "targets", "--model", str(minilm_path), "--targets", "query,value")
    assert code == 0 and out.strip().splitlines()[-1].startswith("12 module(s)")


def test_methods_lists_registered(capsys):
    code, out, _ = run_cli(capsys, "methods")
    assert code == 0
    for name in reparam.methods():
        assert name in out


# --- finetune, inspect, export -----------------------------------------------------------------------------

def test_finetune_writes_adapter(adapter_dir):
    cfg = json.loads((adapter_dir / "reparam_adapter.json").read_text())
    assert cfg["method"] == "lora"
    assert cfg["config"]["r"] == 4 and cfg["config"]["alpha"] == 8.0 and cfg["config"]["dropout"] == 0.1
    assert cfg["modules_to_save"] == ["classifier"] and len(cfg["modules"]) == 37
    side = json.loads((adapter_dir / "reparam_cli.json").read_text())
    assert side["steps"] == 2 and "accuracy" in side["eval_after"]


def test_inspect_reparam_adapter(capsys, adapter_dir):
    code, out, _ = run_cli(capsys, "inspect", str(adapter_dir))
    assert code == 0
    assert "method: lora" in out and "adapted modules: 37" in out
    assert "bert.encoder.layer.0.attention.self.query" in out and "lora_A 4x384, lora_B 384x4" in out
    tensors, _ = reparam.io.adapter_files.read_adapter(adapter_dir)
    assert f"parameters: {sum(t.numel() for t in tensors.values()):,}" in out
    assert "reparam_adapter.safetensors" in out


def test_export_peft_and_reimport(capsys, adapter_dir, tmp_path, minilm_path):
    from transformers import AutoModelForSequenceClassification

    out_dir = tmp_path / "peft"
    code, out, _ = run_cli(capsys, "export", str(adapter_dir), "--format", "peft", "-o", str(out_dir))
    assert code == 0, out
    peft_cfg = json.loads((out_dir / "adapter_config.json").read_text())
    assert peft_cfg["peft_type"] == "LORA" and peft_cfg["r"] == 4 and peft_cfg["lora_alpha"] == 8.0
    assert (out_dir / "adapter_model.safetensors").is_file()

    code, out, _ = run_cli(capsys, "inspect", str(out_dir))
    assert code == 0 and "PEFT adapter" in out

    ids = torch.tensor([[101, 2023, 3185, 2001, 2307, 102]])
    logits = []
    for load in (lambda m: reparam.load_adapter(m, adapter_dir), lambda m: reparam.import_peft(m, out_dir)):
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).eval()
        load(model)
        model.eval()  # adapter modules are created in training mode (dropout 0.1 here)
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-5)


def test_demo_round_trip_runs(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "demo", "--epochs", "0.05", "--quiet", "--output", str(tmp_path / "demo"))
    assert code == 0, out
    assert "dev accuracy before" in out and "dev accuracy after" in out and out.strip().endswith("OK")
    assert (tmp_path / "demo" / "reparam_adapter.safetensors").is_file()


# --- the bundled sentiment data ----------------------------------------------------------------------------

def read_rows(split):
    with open(bundled_data_path(split), newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        rows = list(reader)
    assert header == ["sentence", "label"]
    assert all(len(r) == 2 and r[0].strip() and r[1] in ("0", "1") for r in rows)
    return rows


def test_sentiment_data_is_sound():
    train, dev = read_rows("train"), read_rows("dev")
    assert len(train) >= 300 and len(dev) >= 80
    for rows in (train, dev):
        pos = sum(r[1] == "1" for r in rows)
        assert abs(pos - (len(rows) - pos)) <= 0.1 * len(rows)
        sentences = [r[0].strip().lower() for r in rows]
        assert len(set(sentences)) == len(sentences)
    assert not {r[0].strip().lower() for r in train} & {r[0].strip().lower() for r in dev}


def test_sentiment_data_loads_with_training_loader(minilm_path):
    from transformers import AutoTokenizer

    from reparam.training import load_task

    tok = AutoTokenizer.from_pretrained(minilm_path)
    data = load_task(bundled_data_path("dev"), tok, "dev", max_length=64)
    assert len(data) == len(read_rows("dev")) and data.num_labels == 2 and data.metric_names == ["accuracy"]
