import gc
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from merge_fixtures import save_model
from reparam.merging import load_config, merge_models, merge_state_dicts
from reparam.merging.errors import MergeConfigError, MergeValidationError
from reparam.merging.io import SafetensorsSource, parse_size


def load_folder(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _config(method, bpath, paths, params=None, model_params=None, **extra):
    models = [{"model": str(p), "parameters": dict(model_params or {})} for p in paths]
    cfg = {"merge_method": method, "models": models, "parameters": dict(params or {}), **extra}
    if bpath is not None:
        cfg["base_model"] = str(bpath)
    return cfg


CASES = [
    ("linear", False, {}, {"weight": 0.5}), ("task_arithmetic", True, {"lambda": 0.6}, {"weight": 0.7}),
    ("ties", True, {}, {"density": 0.4, "weight": 1.0}),
    ("ties", True, {"scope": "global"}, {"density": 0.3, "weight": 1.0}),
    ("ties", True, {"scope": "global", "topk_mode": "threshold"}, {"density": 0.3, "weight": 1.0}),
    ("dare_linear", True, {}, {"density": 0.5, "weight": 1.0}),
    ("dare_ties", True, {}, {"density": 0.5, "weight": 1.0}),
    ("breadcrumbs", True, {}, {"density": 0.6, "gamma": 0.05, "weight": 1.0}),
    ("breadcrumbs_ties", True, {}, {"density": 0.6, "weight": 1.0}),
    ("della", True, {}, {"density": 0.5, "epsilon": 0.1, "weight": 1.0}),
    ("della_linear", True, {}, {"density": 0.5, "weight": 1.0}),
    ("model_stock", True, {"filter_wise": True}, {}),
]


@pytest.mark.parametrize("method,with_base,params,mparams", CASES)
def test_streaming_equals_in_memory(tmp_path, models_on_disk, method, with_base, params, mparams):
    base, models, bpath, paths = models_on_disk
    cfg = _config(method, bpath if with_base else None, paths, params, mparams, seed=11)
    out = merge_models(cfg, tmp_path / "out", progress=False, max_shard_size=600)
    got = load_folder(out)
    want = merge_state_dicts(method, base if with_base else None, models, params, mparams, seed=11)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert torch.equal(got["model.position_ids"], base["model.position_ids"])


def test_slerp_yaml_with_base_in_models(tmp_path, models_on_disk):
    base, models, bpath, paths = models_on_disk
    cfg = {"merge_method": "slerp", "base_model": str(bpath),
           "models": [{"model": str(bpath)}, {"model": str(paths[0])}],
           "parameters": {"t": [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.5}]},
           "dtype": "float32", "out_dtype": "bfloat16"}
    yml = tmp_path / "merge.yml"
    yml.write_text(yaml.safe_dump(cfg))
    out = merge_models(yml, tmp_path / "out", progress=False)
    got = load_folder(out)
    want = merge_state_dicts("slerp", base, models[:1], cfg["parameters"], {}, out_dtype=torch.bfloat16)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert got["model.layers.0.mlp.weight"].dtype == torch.bfloat16
    assert torch.equal(got["model.layers.1.mlp.weight"], models[0]["model.layers.1.mlp.weight"].bfloat16())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_output_layout(tmp_path, models_on_disk):
    base, models, bpath, paths = models_on_disk
    out = merge_models(_config("task_arithmetic", bpath, paths), tmp_path / "sharded", progress=False,
                       max_shard_size=700)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {s.name for s in shards}
    assert set(index["weight_map"]) == set(base)
    total = 0
    for s in shards:
        with safe_open(str(s), framework="pt") as f:
            for k in f.keys():
                assert index["weight_map"][k] == s.name
                total += f.get_tensor(k).numel() * f.get_tensor(k).element_size()
    assert index["metadata"]["total_size"] == total
    assert (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert (out / "reparam_merge_config.yml").is_file()
    one = merge_models(_config("task_arithmetic", bpath, paths), tmp_path / "single", progress=True)
    prov = yaml.safe_load((one / "reparam_merge_config.yml").read_text())
    assert prov["reparam_merge"]["merge_method"] == "task_arithmetic"
    assert prov["effective_parameters"]["lambda"] == 1.0 and prov["effective_parameters"]["normalize"] is False
    assert [p.name for p in one.glob("*.safetensors")] == ["model.safetensors"]
    assert not (one / "model.safetensors.index.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
    # the merged folder is itself a valid input
    assert set(SafetensorsSource(out).keys()) == set(base)


def test_dare_seed_reproducible(tmp_path, models_on_disk):
    base, models, bpath, paths = models_on_disk
    cfg = _config("dare_ties", bpath, paths, {}, {"density": 0.3}, seed=5)
    a = load_folder(merge_models(cfg, tmp_path / "a", progress=False))
    b = load_folder(merge_models(cfg, tmp_path / "b", progress=False, max_shard_size=500))
    c = load_folder(merge_models({**cfg, "seed": 6}, tmp_path / "c", progress=False))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_merge_runs_with_older_objects_frozen(tmp_path, models_on_disk, monkeypatch):
    """Objects older than a merge sit out its garbage collections (gc.freeze) and are given back afterwards, also
    when the merge fails; a process that froze objects itself keeps its own freeze."""
    from reparam.merging import engine
    base, models, bpath, paths = models_on_disk
    cfg = _config("ties", bpath, paths, {}, {"density": 0.5})
    frozen_during = []
    real = engine._merge_models
    monkeypatch.setattr(engine, "_merge_models", lambda *a, **k: frozen_during.append(gc.get_freeze_count()) or
                        real(*a, **k))
    assert gc.get_freeze_count() == 0
    merge_models(cfg, tmp_path / "a", progress=False)
    assert frozen_during[-1] > 0 and gc.get_freeze_count() == 0
    with pytest.raises(MergeConfigError):
        merge_models({**cfg, "merge_method": "nope"}, tmp_path / "b", progress=False)
    assert gc.get_freeze_count() == 0
    gc.freeze()  # the caller's own freeze
    try:
        mine = gc.get_freeze_count()
        merge_models(cfg, tmp_path / "c", progress=False)
        assert frozen_during[-1] == mine and gc.get_freeze_count() == mine
    finally:
        gc.unfreeze()


def _bad_model(tmp_path, base, **changes):
    sd = dict(base)
    for k, v in changes.items():
        if v is None:
            sd.pop(k)
        else:
            sd[k] = v
    return save_model(sd, tmp_path / "bad")


def test_shape_mismatch_names_file_tensor_shapes(tmp_path, models_on_disk):
    base, models, bpath, paths = models_on_disk
    bad = _bad_model(tmp_path, models[0], **{"model.layers.0.mlp.bias": torch.zeros(9)})
    out = tmp_path / "out"
    with pytest.raises(MergeValidationError) as e:
        merge_models(_config("ties", bpath, [paths[0], bad]), out, progress=False)
    msg = str(e.value)
    assert "model.layers.0.mlp.bias" in msg and "[9]" in msg and "[8]" in msg
    assert str(bad / "model.safetensors") in msg
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_missing_tensor_and_skip(tmp_path, models_on_disk):
    base, models, bpath, paths = models_on_disk
    bad = _bad_model(tmp_path, models[0], **{"lm_head.weight": None})
    with pytest.raises(MergeValidationError, match=r"tensor 'lm_head.weight' is missing"):
        merge_models(_config("task_arithmetic", bpath, [bad]), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    got = load_folder(merge_models(_config("task_arithmetic", bpath, [bad], on_mismatch="skip"),
                                   tmp_path / "out2", progress=False))
    assert torch.equal(got["lm_head.weight"], base["lm_head.weight"])


def test_config_errors(tmp_path, models_on_disk):
    base, models, bpath, paths = models_on_disk
    out = tmp_path / "out"
    cases = [
        (_config("ties", bpath, paths, model_params={"denisty": 0.5}), r"'denisty'; valid: density, weight"),
        (_config("ties", bpath, paths, params={"lamda": 0.5}), r"no parameter 'lamda'; valid: .*lambda"),
        (_config("slerpy", bpath, paths), r"unknown merge_method 'slerpy'; valid: .*slerp"),
        (_config("ties", tmp_path / "nowhere", paths), r"nowhere.*does not exist"),
        (_config("ties", bpath, paths + [tmp_path / "gone"]), r"gone.*does not exist"),
        (_config("ties", None, paths), r"needs a base_model"),
        (_config("slerp", bpath, paths, params={"t": 0.5}), r"exactly 1"),
        (_config("ties", bpath, paths, model_params={"density": 1.5}), r"density must be a number in \[0"),
        (_config("ties", bpath, paths, params={"scope": "layer"}), r"scope must be one of"),
        ({**_config("ties", bpath, paths), "dtpye": "float16"}, r"unknown config key.*'dtpye'"),
        ({**_config("ties", bpath, paths), "dtype": "float17"}, r"unknown dtype"),
    ]
    for cfg, pattern in cases:
        with pytest.raises(MergeConfigError, match=pattern):
            merge_models(cfg, out, progress=False)
        assert not out.exists()


def test_existing_output_and_overwrite(tmp_path, models_on_disk):
    base, models, bpath, paths = models_on_disk
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(MergeConfigError, match="not empty"):
        merge_models(_config("linear", None, paths), out, progress=False)
    assert (out / "keep.txt").exists()
    merge_models(_config("linear", None, paths), out, progress=False, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_global_defaults_and_exclude(tmp_path, models_on_disk):
    base, models, bpath, paths = models_on_disk
    cfg = _config("ties", bpath, paths[:2], params={"density": 0.5, "lambda": 0.8}, exclude=["lm_head"])
    cfg["models"][1]["parameters"] = {"density": 0.2, "weight": 2.0}
    got = load_folder(merge_models(cfg, tmp_path / "out", progress=False))
    want = merge_state_dicts("ties", base, models[:2], {"lambda": 0.8}, {"density": [0.5, 0.2], "weight": [1, 2.0]},
                             exclude=["lm_head"])
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(got["lm_head.weight"], base["lm_head.weight"])


def test_parse_config_and_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(123) == 123
    with pytest.raises(MergeConfigError):
        parse_size("lots")
    with pytest.raises(MergeConfigError, match="slices"):
        load_config({"merge_method": "linear", "slices": []})
    with pytest.raises(MergeConfigError, match="no 'models'"):
        load_config({"merge_method": "linear"})


def test_cli_helpers(tmp_path, models_on_disk, capsys):
    import argparse

    from reparam.merging.cli import add_merge_parser

    base, models, bpath, paths = models_on_disk
    yml = tmp_path / "m.yml"
    yml.write_text(yaml.safe_dump(_config("linear", None, [str(p) for p in paths])))
    parser = argparse.ArgumentParser()
    add_merge_parser(parser.add_subparsers())
    args = parser.parse_args(["merge", str(yml), "-o", str(tmp_path / "o"), "--no-progress"])
    assert args.func(args) == 0
    assert (tmp_path / "o" / "model.safetensors").is_file() and "written" in capsys.readouterr().out


def test_reparam_merge_command(tmp_path, models_on_disk, capsys):
    from reparam.cli.main import main

    base, models, bpath, paths = models_on_disk
    yml = tmp_path / "m.yml"
    yml.write_text(yaml.safe_dump(_config("ties", str(bpath), [str(p) for p in paths])))
    assert main(["merge", str(yml), "-o", str(tmp_path / "o"), "--no-progress"]) == 0
    assert (tmp_path / "o" / "model.safetensors").is_file()
    cfg = _config("ties", str(bpath), [str(p) for p in paths])
    cfg["parameters"] = {"densty": 0.5}
    yml.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["merge", str(yml), "-o", str(tmp_path / "o2"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("reparam: error:") and "densty" in err[0]
    assert not (tmp_path / "o2").exists()


def test_failure_mid_merge_leaves_nothing(tmp_path, models_on_disk, monkeypatch):
    from reparam.merging import engine

    base, models, bpath, paths = models_on_disk
    calls = []
    real = engine._merge_key

    def flaky(plan, kp, b, ts, thr):
        calls.append(kp.key)
        if len(calls) == 4:
            raise RuntimeError("boom")
        return real(plan, kp, b, ts, thr)

    monkeypatch.setattr(engine, "_merge_key", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        merge_models(_config("ties", bpath, paths, model_params={"density": 0.5}), tmp_path / "out",
                     progress=False, max_shard_size=500)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_write_error_in_the_writer_thread_is_raised_and_leaves_nothing(tmp_path, models_on_disk, monkeypatch):
    """Shards are written from a background thread: a failing write (disk full) reaches the caller and the
    output folder never appears."""
    from reparam.merging import io

    base, models, bpath, paths = models_on_disk
    real_init = io.ShardWriter.__init__

    def failing_file(self, *a, **k):
        real_init(self, *a, **k)
        real_write = self.f.write
        written = []

        def write(buf):
            written.append(1)
            if len(written) == 2:
                raise OSError(28, "No space left on device")
            return real_write(buf)
        self.f = type("F", (), {"write": staticmethod(write), "close": self.f.close,
                                "closed": property(lambda _: False)})()
    monkeypatch.setattr(io.ShardWriter, "__init__", failing_file)
    with pytest.raises(OSError, match="No space left"):
        merge_models(_config("linear", None, paths), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_validation_reads_headers_only(tmp_path, models_on_disk, monkeypatch):
    base, models, bpath, paths = models_on_disk
    bad = _bad_model(tmp_path, models[0], **{"lm_head.weight": torch.zeros(16, 9)})

    def no_data(self, key):
        raise AssertionError("tensor data read during validation")

    monkeypatch.setattr(SafetensorsSource, "get", no_data)
    with pytest.raises(MergeValidationError, match=r"\[16, 9\].*\[16, 8\]"):
        merge_models(_config("ties", bpath, [paths[0], bad]), tmp_path / "out", progress=False)


def test_prefetch_order_and_errors():
    from reparam.merging.engine import prefetch

    assert [x for x, _ in prefetch(range(10), lambda i: i * i)] == list(range(10))
    assert [y for _, y in prefetch(range(5), lambda i: i * i)] == [0, 1, 4, 9, 16]

    def load(i):
        if i == 3:
            raise OSError("disk gone")
        return i

    got = []
    with pytest.raises(OSError, match="disk gone"):
        for x, _ in prefetch(range(10), load):
            got.append(x)
    assert got == [0, 1, 2]
    gen = prefetch(range(1000), lambda i: i)  # abandoned early: the reader thread must stop
    next(gen)
    gen.close()


def test_layer_positions_and_gradients():
    from reparam.merging.params import layer_positions, resolve_value

    keys = ["model.embed_tokens.weight", "model.layers.0.a", "model.layers.1.a", "model.layers.2.a",
            "model.norm.weight", "lm_head.weight"]
    pos = layer_positions(keys)
    assert [pos[k] for k in keys] == [0.0, 0.0, 0.5, 1.0, 0.0, 0.0]  # outside the blocks: t = 0, as mergekit 0.1.x
    assert resolve_value([0.0, 1.0, 0.0], "x", 0.25) == 0.5
    assert resolve_value([0.0, 1.0, 0.0], "x", 0.5) == 1.0
    assert resolve_value([0.0, 1.0, 0.0], "x", 1.0) == 0.0
    spec = [{"filter": "attn", "value": 0.1}, {"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.7}]
    assert resolve_value(spec, "layers.0.self_attn.q", 0.3) == 0.1
    assert resolve_value(spec, "layers.1.mlp.up", 0.5) == 0.5
    assert resolve_value(spec, "norm", 0.5) == 0.7
    assert resolve_value(spec[:2], "norm", 0.5) is None


def test_inputs_are_visited_file_by_file_and_finished_files_unmapped(tmp_path, models_on_disk, monkeypatch):
    # Peak RSS at 1B parameters: a memory-mapped input file stays resident until it is closed, so the engine visits
    # the reference model's tensors file by file and a source unmaps each file once all its tensors were read.
    base, _, bpath, paths = models_on_disk
    src = SafetensorsSource(bpath)
    order = sorted(src.keys(), key=src.order_key)
    files = [src.where(k) for k in order]
    assert files == sorted(files) and len(set(files)) == 3  # grouped by shard
    first = [k for k in order if src.where(k) == files[0]]
    for k in first[:-1]:
        src.get(k)
    assert len(src._handles) == 3
    assert torch.equal(src.get(first[-1]), base[first[-1]])
    assert len(src._handles) == 2  # the first shard is unmapped ...
    assert torch.equal(src.get(first[0]), base[first[0]])  # ... and reopened when read again
    assert len(src._handles) == 3
    src.close()

    reads = []
    real_get = SafetensorsSource.get

    def get(self, key):
        t = real_get(self, key)
        if self.name == str(bpath):
            reads.append((self.where(key), len(self._handles)))
        return t

    monkeypatch.setattr(SafetensorsSource, "get", get)
    out = merge_models(_config("ties", bpath, paths, {"density": 0.5}), tmp_path / "out", progress=False)
    assert set(load_folder(out)) == set(base)
    merge_pass = reads[-len(base):]
    assert [f for f, _ in merge_pass] == sorted(f for f, _ in merge_pass)  # the base is read shard by shard
    counts = [n for _, n in merge_pass]  # mapped base files after each read: each shard unmapped after its last
    assert counts == sorted(counts, reverse=True) and counts[-1] == 0


@pytest.mark.parametrize("method,with_base,params,mparams", [CASES[0], ("linear", False, {}, {"weight": 1.0}),
                                                           CASES[2], CASES[6], CASES[7]])
def test_bf16_inputs_cast_inside_the_kernel_give_the_same_tensors(tmp_path, method, with_base, params, mparams):
    # methods with casts_inputs get the stored bf16 tensors under dtype float32 (no reader-side copy): the result
    # must be bit for bit that of float32 inputs
    from merge_fixtures import make_models

    base, models = make_models(2, seed=4, dtype=torch.bfloat16)
    bpath = save_model(base, tmp_path / "base", shards=2)
    paths = [save_model(m, tmp_path / f"m{i}") for i, m in enumerate(models)]
    cfg = _config(method, bpath if with_base else None, paths, params, mparams, seed=5, dtype="float32",
                  out_dtype="float32")
    got = load_folder(merge_models(cfg, tmp_path / "out", progress=False))
    as32 = [{k: v.float() if v.is_floating_point() else v for k, v in sd.items()} for sd in [base, *models]]
    want = merge_state_dicts(method, as32[0] if with_base else None, as32[1:], params,
                             {k: [v] * 2 for k, v in mparams.items()}, seed=5)
    for k in want:
        assert torch.equal(got[k], want[k].to(got[k].dtype)), k
