"""bench/merge_speed.py: the synthetic Llama models, the floor, the measured-child plumbing and the summary."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import merge_speed as ms  # noqa: E402

from reparam.merging.io import INDEX_NAME, SafetensorsSource  # noqa: E402

MICRO = dict(hidden=32, intermediate=48, layers=2, heads=4, kv_heads=2, vocab=96, shard_mb=0.006)


@pytest.fixture
def micro(monkeypatch, tmp_path):
    monkeypatch.setitem(ms.SIZES, "micro", MICRO)
    return ms.ensure_models(tmp_path / "cache", "micro")


def test_1b_has_tinyllama_shapes():
    # TinyLlama-1.1B (d=2048, 22 layers, GQA 32/4 heads, vocab 32000, untied head): 1,100,048,384 parameters
    assert sum(torch.Size(s).numel() for _, s in ms.llama_tensors(ms.SIZES["1b"])) == 1_100_048_384
    assert 0.45e9 < sum(torch.Size(s).numel() for _, s in ms.llama_tensors(ms.SIZES["0.5b"])) < 0.55e9


def test_generated_models_are_sharded_hf_llama_folders(micro):
    base = SafetensorsSource(micro["base"])
    index = json.loads((micro["base"] / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) >= 2
    assert set(base.keys()) == {k for k, _ in ms.llama_tensors(MICRO)}
    assert base.shape("model.layers.1.self_attn.k_proj.weight") == (16, 32)  # 2 kv heads x head dim 8
    assert all(base.dtype(k) == torch.bfloat16 for k in base.keys())
    cfg = json.loads((micro["ft2"] / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_key_value_heads"] == 2
    assert cfg["tie_word_embeddings"] is False
    emb = base.get("model.embed_tokens.weight").float()
    assert emb.std().item() == pytest.approx(ms.INIT_STD, rel=0.1)
    assert torch.equal(base.get("model.norm.weight").float(), torch.ones(32))
    ft = SafetensorsSource(micro["ft2"]).get("model.embed_tokens.weight").float()
    assert (ft - emb).std().item() == pytest.approx(ms.FT_STD, rel=0.15)  # base + small noise (bf16 rounding)


def test_cache_is_reused_and_regenerated_when_the_spec_changes(micro, monkeypatch, tmp_path):
    shard = sorted(micro["ft1"].glob("*.safetensors"))[0]
    mtime = shard.stat().st_mtime_ns
    ms.ensure_models(tmp_path / "cache", "micro")
    assert shard.stat().st_mtime_ns == mtime
    monkeypatch.setitem(ms.SIZES, "micro", {**MICRO, "layers": 3})
    paths = ms.ensure_models(tmp_path / "cache", "micro")
    assert "model.layers.2.mlp.up_proj.weight" in SafetensorsSource(paths["ft1"]).keys()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["micro"]  # no temporary folder left


def test_method_configs_give_both_tools_the_same_inputs(micro):
    lin = ms.method_config("linear", micro, "float32")
    ties = ms.method_config("ties", micro, "float32")
    assert "base_model" not in lin and len(ms.config_inputs(lin)) == 3
    assert ms.config_inputs(ties) == [str(micro[m]) for m in ms.MODELS]
    assert {m["parameters"]["density"] for m in ties["models"]} == {0.5}
    assert ties["out_dtype"] == "bfloat16"


def test_floor_writes_an_output_of_the_merged_size(micro, tmp_path):
    import yaml

    work = tmp_path / "work"
    work.mkdir()
    cfg = work / "ties.yml"
    cfg.write_text(yaml.safe_dump(ms.method_config("ties", micro, "float32")))
    ms.floor_child(str(cfg), str(work / "out"))
    base = SafetensorsSource(micro["base"])
    assert ms.check_output(work / "out", base) is None
    out = SafetensorsSource(work / "out")
    assert all(torch.equal(out.get(k), base.get(k)) for k in base.keys())
    assert sorted(p.name for p in work.iterdir()) == ["out", "ties.yml"]  # written atomically, nothing left over


def test_check_output_names_what_is_wrong(micro, tmp_path):
    from safetensors.torch import save_file

    base = SafetensorsSource(micro["base"])
    tensors = {k: base.get(k).clone() for k in base.keys()}
    tensors.pop("lm_head.weight")
    (tmp_path / "a").mkdir()
    save_file(tensors, str(tmp_path / "a" / "model.safetensors"))
    assert "1 tensor(s) missing, e.g. lm_head.weight" in ms.check_output(tmp_path / "a", base)
    tensors = {k: base.get(k).float() for k in base.keys()}
    (tmp_path / "b").mkdir()
    save_file(tensors, str(tmp_path / "b" / "model.safetensors"))
    assert "wrong shape or dtype" in ms.check_output(tmp_path / "b", base)
    assert "unreadable output" in ms.check_output(tmp_path / "nothing", base)


def test_run_child_reports_exit_code_and_this_childs_peak_memory(tmp_path):
    hold = "b = bytearray(300_000_000); b[::4096] = b'x' * len(b[::4096]); import time; time.sleep(0.3)"
    big = ms.run_child([sys.executable, "-c", hold], {}, tmp_path / "log")
    small = ms.run_child([sys.executable, "-c", "import sys; print('hi'); sys.exit(3)"], {}, tmp_path / "log")
    assert big["rc"] == 0 and small["rc"] == 3
    assert big["peak_rss_gb"] > 0.3 and big["peak_anon_gb"] > 0.29
    assert small["peak_rss_gb"] < 0.1  # its own high-water mark, not the earlier child's
    assert (tmp_path / "log").read_text() == "hi\n"


def test_summary_uses_per_round_ratios_and_skips_failed_runs():
    def run(rnd, tool, wall, rc=0):
        return {"round": rnd, "method": "ties", "tool": tool, "wall_s": wall, "cpu_s": wall, "rc": rc,
                "peak_rss_gb": 2.0 if tool == "reparam" else 4.0, "peak_anon_gb": 1.0, "output_error": None}
    runs = [run(0, "floor", 1), run(1, "floor", 2), run(2, "floor", 4),
            run(0, "reparam", 1.5), run(1, "reparam", 2), run(2, "reparam", 8),
            run(0, "mergekit", 15), run(1, "mergekit", 10), run(2, "mergekit", 16), run(3, "mergekit", 1, rc=1)]
    meta = {"methods": ["ties"], "tools": ["floor", "reparam", "mergekit"]}
    rows = {r["tool"]: r for r in ms.summarise(runs, meta)["rows"]}
    assert rows["reparam"]["over_floor"]["median"] == 1.5  # ratios 1.5, 1.0, 2.0
    assert rows["reparam"]["time_vs_mergekit"]["median"] == pytest.approx(0.2)  # 0.1, 0.2, 0.5
    assert rows["reparam"]["rss_vs_mergekit"] == 0.5
    assert rows["mergekit"]["runs"] == 3 and rows["mergekit"]["failed"] == 1
