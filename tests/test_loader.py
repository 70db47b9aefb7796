"""loader.py: every official checkpoint layout loads to the same logits; every bad checkpoint names its fault.

The tests write their own checkpoints (tiny random models) in the official layouts; nothing touches the
network. The Hub path is exercised offline against a hand-built Hugging Face cache.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from glmkit import loader
from glmkit.config import ConfigError, ModelConfig
from glmkit.loader import (
    CheckpointError,
    load_model,
    resolve_model_dir,
    save_model,
    save_prefix,
)
from glmkit.model import ChatGLMForCausalLM

REPO_ROOT = Path(__file__).resolve().parents[1]
INPUT_IDS = torch.tensor([[5, 17, 3, 99, 42, 7, 64, 1]])
LAYOUTS = ["bin", "bin-sharded", "safetensors", "safetensors-sharded"]


def tiny_config(**overrides) -> ModelConfig:
    # The tiny preset with a small vocabulary: the 65024-row embedding would dominate every test's time.
    return dataclasses.replace(ModelConfig.preset("tiny"), padded_vocab_size=128, **overrides)


def random_model(config: ModelConfig, seed: int = 0) -> ChatGLMForCausalLM:
    torch.manual_seed(seed)
    model = ChatGLMForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():  # norms too: a weight loaded into the wrong place must show
            p.normal_(0, 0.3)
    return model.eval()


def logits(model: ChatGLMForCausalLM) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT_IDS).float()


def write_checkpoint(model: ChatGLMForCausalLM, folder: Path, layout: str, dtype: torch.dtype | None = None,
                     extra: dict[str, torch.Tensor] | None = None, config: ModelConfig | None = None) -> dict:
    """Write config.json and weights as the official tools do; return the state dict written."""
    folder.mkdir(parents=True, exist_ok=True)
    (config or model.config).save_json(folder / "config.json")
    state = {n: t.detach().clone().to(dtype or t.dtype) for n, t in model.state_dict().items()}
    state.update(extra or {})
    write_weights(state, folder, layout)
    return state


def write_weights(state: dict[str, torch.Tensor], folder: Path, layout: str, num_shards: int = 2) -> None:
    kind, _, sharded = layout.partition("-")
    save = torch.save if kind == "bin" else (lambda d, p: save_file(d, p, metadata={"format": "pt"}))
    if not sharded:
        save(state, folder / ("pytorch_model.bin" if kind == "bin" else "model.safetensors"))
        return
    names = list(state)
    weight_map = {}
    for i in range(num_shards):
        file = (f"pytorch_model-{i + 1:05d}-of-{num_shards:05d}.bin" if kind == "bin"
                else f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors")
        part = names[i::num_shards]
        save({n: state[n] for n in part}, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": sum(t.nbytes for t in state.values())}, "weight_map": weight_map}
    index_name = "pytorch_model.bin.index.json" if kind == "bin" else "model.safetensors.index.json"
    (folder / index_name).write_text(json.dumps(index, indent=2))


def index_path(folder: Path) -> Path:
    return next(folder.glob("*.index.json"))


def edit_index(folder: Path, edit) -> None:
    path = index_path(folder)
    index = json.loads(path.read_text())
    edit(index["weight_map"])
    path.write_text(json.dumps(index))


@pytest.fixture(scope="module")
def model() -> ChatGLMForCausalLM:
    return random_model(tiny_config())


# ---- every layout loads exactly ---------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_official_layout_loads_to_identical_logits(model, tmp_path, layout):
    state = write_checkpoint(model, tmp_path, layout)
    loaded = load_model(tmp_path, dtype=torch.float32)
    assert not loaded.training
    assert set(loaded.state_dict()) == set(state)
    assert all(not p.is_meta and p.dtype == torch.float32 for p in loaded.parameters())
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_save_over_the_folder_it_was_loaded_from(model, tmp_path):
    write_checkpoint(model, tmp_path, "bin")
    loaded = load_model(tmp_path, dtype="float32")
    (tmp_path / "pytorch_model.bin").unlink()
    save_model(loaded, tmp_path, max_shard_bytes=10_000)
    torch.testing.assert_close(logits(load_model(tmp_path, dtype="float32")), logits(model), rtol=0, atol=0)


def test_safetensors_preferred_when_both_formats_exist(model, tmp_path):
    other = random_model(model.config, seed=1)
    write_checkpoint(model, tmp_path, "safetensors-sharded")
    write_checkpoint(other, tmp_path, "bin-sharded")
    torch.testing.assert_close(logits(load_model(tmp_path, dtype="float32")), logits(model), rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["bin-sharded", "safetensors"])
def test_float16_checkpoint_becomes_bfloat16_model(model, tmp_path, layout):
    state = write_checkpoint(model, tmp_path, layout, dtype=torch.float16)
    for dtype in ("bfloat16", torch.bfloat16):
        loaded = load_model(tmp_path, dtype=dtype)
        assert loaded.dtype == torch.bfloat16
        for name, t in loaded.state_dict().items():
            assert t.dtype == torch.bfloat16, name
            assert torch.equal(t, state[name].to(torch.bfloat16)), name


def test_model_is_built_on_the_meta_device(model, tmp_path, monkeypatch):
    # No random initialisation and no second copy: the checkpoint's tensors become the parameters.
    built_on = []

    def spy(config):
        built = ChatGLMForCausalLM(config)
        built_on.append({p.device.type for p in built.parameters()})
        return built

    monkeypatch.setattr(loader, "ChatGLMForCausalLM", spy)
    write_checkpoint(model, tmp_path, "safetensors")
    loaded = load_model(tmp_path, dtype=torch.float32)
    assert built_on == [{"meta"}]
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}


def test_unknown_dtype_is_refused(model, tmp_path):
    write_checkpoint(model, tmp_path, "safetensors")
    with pytest.raises(ValueError, match="unknown dtype 'int4'"):
        load_model(tmp_path, dtype="int4")


@pytest.mark.parametrize("layout", ["bin", "bin-sharded", "safetensors-sharded"])
def test_inv_freq_in_checkpoint_is_ignored(model, tmp_path, layout):
    inv_freq = {loader.INV_FREQ: torch.arange(8, dtype=torch.float32)}
    state = write_checkpoint(model, tmp_path, layout, extra=inv_freq)
    loaded = load_model(tmp_path, dtype=torch.float32)
    assert set(loaded.state_dict()) == set(state) - {loader.INV_FREQ}
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_straight_onto_cuda(model, tmp_path):
    write_checkpoint(model, tmp_path, "bin-sharded", dtype=torch.float16)
    on_gpu = load_model(tmp_path, dtype=torch.bfloat16, device="cuda")
    on_cpu = load_model(tmp_path, dtype=torch.bfloat16)
    assert all(p.device.type == "cuda" and p.dtype == torch.bfloat16 for p in on_gpu.parameters())
    for name, t in on_gpu.state_dict().items():
        assert torch.equal(t.cpu(), on_cpu.state_dict()[name]), name
    with torch.no_grad():
        torch.testing.assert_close(on_gpu(INPUT_IDS.cuda()).float().cpu(), logits(on_cpu), rtol=0.05, atol=0.05)


# ---- errors that name the problem -------------------------------------------------------------------------

def test_no_config_json(model, tmp_path):
    write_checkpoint(model, tmp_path, "safetensors")
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json in"):
        load_model(tmp_path)


def test_unsupported_config_passes_config_error_through(model, tmp_path):
    write_checkpoint(model, tmp_path, "safetensors")
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(position_encoding_2d=True, inner_hidden_size=16384, max_sequence_length=2048)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="first-generation ChatGLM-6B"):
        load_model(tmp_path)


def test_no_weight_files(model, tmp_path):
    model.config.save_json(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=r"no weights in .*expected model.safetensors.index.json"):
        load_model(tmp_path)


@pytest.mark.parametrize("layout", ["bin-sharded", "safetensors-sharded"])
def test_index_refers_to_missing_shard(model, tmp_path, layout):
    write_checkpoint(model, tmp_path, layout)
    missing = sorted(tmp_path.glob("*-00002-of-00002.*"))[0]
    missing.unlink()
    with pytest.raises(CheckpointError, match=rf"missing from .*{missing.name}"):
        load_model(tmp_path)


def test_index_without_entry_for_needed_tensor(model, tmp_path):
    write_checkpoint(model, tmp_path, "safetensors-sharded")
    name = "transformer.encoder.final_layernorm.weight"
    edit_index(tmp_path, lambda wm: wm.pop(name))
    with pytest.raises(CheckpointError, match=rf"model.safetensors.index.json maps no shard to 1 tensor\(s\) "
                                              rf"the model needs: {name}"):
        load_model(tmp_path)


def test_index_maps_tensor_to_shard_that_lacks_it(model, tmp_path):
    write_checkpoint(model, tmp_path, "bin-sharded")
    name = "transformer.output_layer.weight"
    other = {"pytorch_model-00001-of-00002.bin": "pytorch_model-00002-of-00002.bin",
             "pytorch_model-00002-of-00002.bin": "pytorch_model-00001-of-00002.bin"}
    edit_index(tmp_path, lambda wm: wm.update({name: other[wm[name]]}))
    with pytest.raises(CheckpointError, match=rf"maps 1 tensor\(s\) to pytorch_model-0000\d-of-00002.bin, which "
                                              rf"does not hold them: {name}"):
        load_model(tmp_path)


def test_malformed_index(model, tmp_path):
    write_checkpoint(model, tmp_path, "safetensors-sharded")
    index_path(tmp_path).write_text("{not json")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json is not valid JSON"):
        load_model(tmp_path)
    index_path(tmp_path).write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match='has no "weight_map"'):
        load_model(tmp_path)
    index_path(tmp_path).write_text(json.dumps({"weight_map": {"x": "../../etc/passwd"}}))
    with pytest.raises(CheckpointError, match="shard files outside its folder"):
        load_model(tmp_path)


@pytest.mark.parametrize("layout", ["bin", "safetensors"])
def test_missing_tensors_listed_compactly(model, tmp_path, layout):
    state = {n: t for n, t in model.state_dict().items() if ".layers." not in n}
    model.config.save_json(tmp_path / "config.json")
    write_weights(state, tmp_path, layout)
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path)
    message = str(err.value)
    assert "lacks 14 tensor(s) the model needs" in message  # 7 per block
    assert "transformer.encoder.layers.0.input_layernorm.weight" in message
    assert message.count("transformer.encoder.layers.") == 10 and "(14 in all)" in message


@pytest.mark.parametrize("layout", ["bin", "safetensors-sharded"])
def test_unexpected_tensors_listed(model, tmp_path, layout):
    extra = {"transformer.encoder.layers.2.mlp.dense_4h_to_h.weight": torch.zeros(4, 4),
             "lm_head.weight": torch.zeros(2)}
    write_checkpoint(model, tmp_path, layout, extra=extra)
    with pytest.raises(CheckpointError, match=r"holds 2 tensor\(s\) this model does not have: "
                                              r"lm_head.weight, transformer.encoder.layers.2.mlp"):
        load_model(tmp_path)


@pytest.mark.parametrize("layout", ["bin-sharded", "safetensors"])
def test_wrong_shape_names_tensor_and_both_shapes(model, tmp_path, layout):
    name = "transformer.encoder.layers.1.self_attention.dense.weight"
    write_checkpoint(model, tmp_path, layout, extra={name: torch.zeros(64, 32)})
    with pytest.raises(CheckpointError, match=rf"{name} is \[64, 32\], expected \[64, 64\]"):
        load_model(tmp_path)


@pytest.mark.parametrize("layout", ["bin", "bin-sharded", "safetensors", "safetensors-sharded"])
def test_truncated_shard_names_the_file(model, tmp_path, layout):
    write_checkpoint(model, tmp_path, layout)
    shard = sorted(p for p in tmp_path.iterdir() if p.suffix in (".bin", ".safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"cannot read .*{shard.name}: the file is corrupt or truncated"):
        load_model(tmp_path)


class _RunsCode:
    """Unpickling this creates `marker`: what a malicious .bin shard would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_that_runs_code_is_refused(model, tmp_path):
    write_checkpoint(model, tmp_path, "bin-sharded")
    marker = tmp_path / "pwned"
    shard = tmp_path / "pytorch_model-00001-of-00002.bin"
    evil = torch.load(shard, weights_only=True)
    evil["transformer.output_layer.weight"] = _RunsCode(marker)
    torch.save(evil, shard)
    with pytest.raises(CheckpointError, match=r"refusing to load .*pytorch_model-00001-of-00002.bin: it holds "
                                              r"pickled objects other than tensors.*Unsupported global"):
        load_model(tmp_path)
    assert not marker.exists()
    # The payload is live: an unsafe load would have run it.
    torch.load(shard, weights_only=False)["transformer.output_layer.weight"].close()
    assert marker.exists()


def test_bin_holding_a_non_tensor_is_refused(model, tmp_path):
    state = write_checkpoint(model, tmp_path, "bin")
    torch.save({**state, "step": 3}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="entries that are not named tensors: step"):
        load_model(tmp_path)


# ---- P-Tuning v2 ------------------------------------------------------------------------------------------

def with_prefix(base: ChatGLMForCausalLM, projection: bool, pre_seq_len: int = 4) -> ChatGLMForCausalLM:
    """`base`'s weights plus a random P-Tuning prefix."""
    tuned = random_model(dataclasses.replace(base.config, pre_seq_len=pre_seq_len, prefix_projection=projection),
                         seed=7)
    tuned.load_state_dict(base.state_dict(), strict=False)
    return tuned


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_only_checkpoint_on_a_base(model, tmp_path, projection):
    tuned = with_prefix(model, projection)
    write_checkpoint(model, tmp_path / "base", "bin-sharded")  # the official release's layout
    save_prefix(tuned, tmp_path / "prefix")
    with safe_open(tmp_path / "prefix" / "model.safetensors", "pt") as f:
        assert sorted(f.keys()) == sorted(n for n in tuned.state_dict() if n.startswith("transformer.prefix_encoder."))
        assert len(list(f.keys())) == (5 if projection else 1)  # embedding (+ trans.0, trans.2 weight and bias)
    assert json.loads((tmp_path / "base" / "config.json").read_text())["pre_seq_len"] is None

    loaded = load_model(tmp_path / "base", dtype=torch.float32, prefix=tmp_path / "prefix")
    assert (loaded.config.pre_seq_len, loaded.config.prefix_projection) == (4, projection)
    assert set(loaded.state_dict()) == set(tuned.state_dict())
    torch.testing.assert_close(logits(loaded), logits(tuned), rtol=0, atol=0)
    assert not torch.equal(logits(loaded), logits(model))  # the prefix does take part


@pytest.mark.parametrize("projection", [False, True])
def test_official_prefix_bin_on_a_float16_base(model, tmp_path, projection):
    # The official P-Tuning trainer saves a pytorch_model.bin of the prefix beside the full config.json.
    tuned = with_prefix(model, projection)
    write_checkpoint(model, tmp_path / "base", "safetensors", dtype=torch.float16)
    prefix_state = {n: t for n, t in tuned.state_dict().items() if n.startswith("transformer.prefix_encoder.")}
    (tmp_path / "prefix").mkdir()
    tuned.config.save_json(tmp_path / "prefix" / "config.json")
    torch.save(prefix_state, tmp_path / "prefix" / "pytorch_model.bin")
    loaded = load_model(tmp_path / "base", dtype="bfloat16", prefix=tmp_path / "prefix")
    assert all(t.dtype == torch.bfloat16 for t in loaded.state_dict().values())
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, tuned.state_dict()[name].half().bfloat16() if "prefix" not in name
                           else tuned.state_dict()[name].bfloat16()), name


def test_full_checkpoint_with_prefix_in_it(model, tmp_path):
    tuned = with_prefix(model, projection=True)
    state = write_checkpoint(tuned, tmp_path, "safetensors-sharded")
    loaded = load_model(tmp_path, dtype=torch.float32)
    assert set(loaded.state_dict()) == set(state)
    torch.testing.assert_close(logits(loaded), logits(tuned), rtol=0, atol=0)


def test_config_with_prefix_but_no_prefix_tensors(model, tmp_path):
    tuned = with_prefix(model, projection=False)
    write_checkpoint(model, tmp_path, "safetensors", config=tuned.config)
    with pytest.raises(CheckpointError, match=r"transformer.prefix_encoder.embedding.weight; config.json sets "
                                              r"pre_seq_len=4 .*pass prefix="):
        load_model(tmp_path)


def test_prefix_for_another_base_is_refused(model, tmp_path):
    write_checkpoint(model, tmp_path / "base", "safetensors")
    other_base = random_model(tiny_config(num_layers=3))
    save_prefix(with_prefix(other_base, projection=False), tmp_path / "prefix")
    with pytest.raises(CheckpointError, match=r"transformer.prefix_encoder.embedding.weight is \[4, 192\], "
                                              r"expected \[4, 128\].*does not fit this base model"):
        load_model(tmp_path / "base", prefix=tmp_path / "prefix")


def test_prefix_folder_must_hold_only_a_prefix_and_have_pre_seq_len(model, tmp_path):
    write_checkpoint(model, tmp_path / "base", "safetensors")
    write_checkpoint(model, tmp_path / "not_prefix", "safetensors")
    with pytest.raises(CheckpointError, match="has no pre_seq_len: not a P-Tuning v2 checkpoint"):
        load_model(tmp_path / "base", prefix=tmp_path / "not_prefix")
    tuned = with_prefix(model, projection=False)
    write_checkpoint(tuned, tmp_path / "full", "safetensors")
    with pytest.raises(CheckpointError, match="tensor\\(s\\) this model does not have: transformer.embedding"):
        load_model(tmp_path / "base", prefix=tmp_path / "full")


def test_save_prefix_needs_a_prefix(model, tmp_path):
    with pytest.raises(ValueError, match="no P-Tuning prefix"):
        save_prefix(model, tmp_path)


# ---- saving -----------------------------------------------------------------------------------------------

def test_save_model_round_trip_sharded(model, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"sentencepiece bytes")
    out = save_model(model, tmp_path / "out", max_shard_bytes=40_000, tokenizer_path=tmp_path / "tokenizer.model")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 3 and not (out / "model.safetensors").exists()
    assert [s.name for s in shards] == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                        for i in range(1, len(shards) + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    state = model.state_dict()
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in state.values())
    assert set(index["weight_map"]) == set(state)
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and config["model_type"] == "chatglm"
    assert (out / "tokenizer.model").read_bytes() == b"sentencepiece bytes"
    mode = (out / "config.json").stat().st_mode  # not safetensors' owner-only default
    assert all(s.stat().st_mode == mode for s in shards)

    loaded = load_model(out, dtype=torch.float32)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_save_model_single_file_replaces_earlier_shards(model, tmp_path):
    save_model(model, tmp_path, max_shard_bytes=40_000)
    bf16 = load_model(tmp_path, dtype=torch.bfloat16)
    (tmp_path / "tokenizer.model").write_bytes(b"spm")
    save_model(bf16, tmp_path, tokenizer_path=tmp_path)  # a tokenizer already in place is left as it is
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again = load_model(tmp_path, dtype=torch.bfloat16)
    for name, t in again.state_dict().items():
        assert torch.equal(t, bf16.state_dict()[name]), name


# ---- finding checkpoints: local folders and the Hub -------------------------------------------------------

def test_resolve_local_folder_returns_it(tmp_path):
    assert resolve_model_dir(tmp_path) == tmp_path
    assert resolve_model_dir(str(tmp_path)) == tmp_path


def test_resolve_rejects_what_is_neither_folder_nor_repo_id(tmp_path):
    for name in [str(tmp_path / "missing"), "./no/such/folder", "bad--id", tmp_path / "missing"]:
        with pytest.raises(CheckpointError, match="no folder at .*not a Hugging Face Hub id"):
            resolve_model_dir(name)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file; expected a checkpoint folder"):
        resolve_model_dir(tmp_path / "file")


OFFICIAL_CHATGLM3_FILES = (["config.json", "configuration_chatglm.py", "modeling_chatglm.py", "tokenizer.model",
                            "tokenization_chatglm.py", "pytorch_model.bin.index.json", "model.safetensors.index.json"]
                           + [f"pytorch_model-0000{i}-of-00007.bin" for i in range(1, 8)]
                           + [f"model-0000{i}-of-00007.safetensors" for i in range(1, 8)])


def test_hub_download_fetches_one_weight_format_and_no_code(model, tmp_path, monkeypatch):
    calls = []

    class FakeApi:
        def list_repo_files(self, repo_id, revision=None):
            return OFFICIAL_CHATGLM3_FILES

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        write_checkpoint(model, tmp_path, "safetensors")
        return str(tmp_path)

    monkeypatch.setattr(loader, "is_offline_mode", lambda: False)
    monkeypatch.setattr(loader, "HfApi", FakeApi)
    monkeypatch.setattr(loader, "snapshot_download", fake_snapshot_download)
    loaded = load_model("THUDM/chatglm3-6b", dtype=torch.float32)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)

    [(repo_id, kwargs)] = calls
    fetched = [f for f in OFFICIAL_CHATGLM3_FILES if any(fnmatch.fnmatch(f, p) for p in kwargs["allow_patterns"])]
    assert repo_id == "THUDM/chatglm3-6b"
    assert sorted(fetched) == sorted(["config.json", "tokenizer.model", "model.safetensors.index.json"]
                                     + [f"model-0000{i}-of-00007.safetensors" for i in range(1, 8)])
    only_bin = [f for f in OFFICIAL_CHATGLM3_FILES if "safetensors" not in f]
    assert loader._hub_weight_patterns(only_bin) == ["pytorch_model.bin.index.json", "pytorch_model*.bin"]


def _populate_hf_cache(model: ChatGLMForCausalLM, hub: Path, repo_id: str, commit: str) -> Path:
    """The layout huggingface_hub writes: blobs by hash, a snapshot of symlinks per commit, refs/main."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    write_checkpoint(model, snapshot, "safetensors-sharded")
    (repo / "blobs").mkdir(parents=True)
    for file in list(snapshot.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        file.rename(blob)
        file.symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_offline_hub_ids_resolve_from_cache_or_fail_naming_the_id(model, tmp_path):
    # huggingface_hub reads HF_HUB_OFFLINE and HF_HOME when imported, so this runs in a fresh interpreter.
    commit = "a" * 40
    snapshot = _populate_hf_cache(model, tmp_path / "hf" / "hub", "someorg/tiny-glm", commit)
    script = textwrap.dedent("""
        import json
        from glmkit.loader import CheckpointError, resolve_model_dir
        result = {"cached": str(resolve_model_dir("someorg/tiny-glm"))}
        try:
            resolve_model_dir("someorg/not-cached")
        except CheckpointError as e:
            result["uncached"] = str(e)
        print(json.dumps(result))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(result["cached"]).resolve() == snapshot.resolve()
    assert "'someorg/not-cached' is not a local folder" in result["uncached"]
    assert "offline" in result["uncached"]
    # The cache's snapshot is symlinks into blobs: loading follows them.
    loaded = load_model(result["cached"], dtype=torch.float32)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
