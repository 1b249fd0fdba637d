"""Flow configurations: the shipped YAML files load, and every mistake names key and fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from lplr_dask import CompressionOptions
from lplr_dask.errors import ConfigError
from pipelines.config import ClusterConfig, expand, load_config, parse_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path, monkeypatch):
    monkeypatch.setenv("LPLR_DATA", "/data")
    cfg = load_config(path)
    assert cfg.compression.method
    assert cfg.cluster.kind in ("local", "cuda", "address")


def test_demo_config_defaults(monkeypatch):
    monkeypatch.delenv("LPLR_DATA", raising=False)
    cfg = load_config(next(p for p in CONFIGS if p.name == "demo.yaml"))
    assert cfg.inputs.paths == ("${LPLR_DATA:-/tmp/lplr-demo}/demo.zarr",)
    assert cfg.jobs() == [("/tmp/lplr-demo/demo.zarr", "/tmp/lplr-demo/compressed/demo.lplr.zarr")]
    assert cfg.generate.shape == (4096, 4096)
    assert cfg.compression == CompressionOptions(method="lplr", budget=1.0, seed=0)


BASE = {"inputs": ["a.zarr"], "output_dir": "out", "compression": {"budget": 1.0}}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"compresion": {}}, "unknown key 'compresion'. Did you mean 'compression'?"),
        ({"compression": {"bits_left": "4", "budget": 1}}, "compression.bits_left='4' must be an"),
        ({"compression": {"rank": 8, "budget": 1}}, "compression: Give either rank or budget"),
        ({"compression": {"method": "svd", "rank": 8}}, "compression: method='svd' is unknown"),
        ({"compression": {"method": "lplr"}}, "compression: method='lplr' needs a rank"),
        ({"compression": {"budget": -1}}, "compression: budget=-1.0 must be a positive"),
        ({"compression": {"budget": 1, "block_shape": [4096]}}, "must have 2 entries"),
        ({"cluster": {"kind": "address"}}, "cluster.address is required"),
        ({"cluster": {"kind": "slurm"}}, "cluster.kind='slurm' is unknown"),
        ({"cluster": {"n_workers": 0}}, "cluster.n_workers=0 must be at least 1"),
        ({"cluster": {"device": "tpu"}}, "cluster.device='tpu' is unknown"),
        ({"resume": "yes"}, "resume='yes' must be true or false"),
        ({"inputs": {}}, "inputs is empty"),
        ({"output_dir": None}, "output_dir=None must be a string"),
    ],
)
def test_mistakes_name_the_key_and_the_fix(change, message):
    with pytest.raises(ConfigError) as info:
        parse_config({**BASE, **change}, source="x.yaml")
    assert message in str(info.value)
    assert str(info.value).startswith("x.yaml: ")


def test_missing_required_keys():
    with pytest.raises(ConfigError, match="needs inputs, output_dir"):
        parse_config({})


def test_not_yaml_and_not_a_mapping(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("inputs: [a\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(p)


def test_environment_expansion(monkeypatch):
    monkeypatch.setenv("LPLR_X", "/x")
    monkeypatch.delenv("LPLR_UNSET", raising=False)
    assert expand("${LPLR_X}/a") == "/x/a"
    assert expand("${LPLR_UNSET:-/d}/a") == "/d/a"
    with pytest.raises(ConfigError, match="LPLR_UNSET is not set"):
        expand("${LPLR_UNSET}/a")
    cluster = ClusterConfig(kind="address", address="${LPLR_UNSET:-tcp://127.0.0.1:8786}")
    assert cluster.target == "tcp://127.0.0.1:8786"


def test_inputs_list_glob_and_group(tmp_path):
    a = np.zeros((16, 16), np.float32)
    for name in ("m1.zarr", "m2.zarr"):
        zarr.create_array(str(tmp_path / name), shape=a.shape, dtype=a.dtype)
    grp = zarr.open_group(str(tmp_path / "layers.zarr"), mode="w")
    grp.create_array("q", shape=(8, 8), dtype="float32")
    grp.create_array("k", shape=(8, 8), dtype="float32")
    grp.create_array("bias", shape=(8,), dtype="float32")  # not a matrix: skipped
    cfg = parse_config(
        {
            "inputs": {"glob": str(tmp_path / "m*.zarr"), "group": str(tmp_path / "layers.zarr")},
            "output_dir": str(tmp_path / "out"),
        }
    )
    outs = [Path(o).name for _, o in cfg.jobs()]
    assert outs == ["m1.lplr.zarr", "m2.lplr.zarr", "layers.k.lplr.zarr", "layers.q.lplr.zarr"]
    with pytest.raises(ConfigError, match="matches no file"):
        parse_config({"inputs": {"glob": str(tmp_path / "none*")}, "output_dir": "o"}).jobs()


def test_two_inputs_with_one_output_name(tmp_path):
    cfg = parse_config({"inputs": ["a/x.zarr", "b/x.zarr"], "output_dir": "o"})
    with pytest.raises(ConfigError, match="would both write"):
        cfg.jobs()


def test_compression_section_is_the_options_object():
    """The YAML ``compression:`` keys are CompressionOptions' fields, validated by it."""
    cfg = parse_config({**BASE, "compression": {"method": "nq", "bits_matrix": 3}})
    assert cfg.compression == CompressionOptions(method="nq", bits_matrix=3)
    with pytest.raises(ConfigError, match=r"key 'compression\.ranks'\. Did you mean 'rank'"):
        parse_config({**BASE, "compression": {"ranks": 8}})


def test_allow_missing_chunks_is_a_run_flag(tmp_path):
    """Reading missing chunks as the fill value is about the input, not the compression: a
    top-level key beside resume and verify (the flow passes it to the job)."""
    cfg = parse_config(
        {"inputs": "A.zarr", "output_dir": str(tmp_path), "allow_missing_chunks": True}
    )
    assert cfg.allow_missing_chunks is True
    assert parse_config(BASE).allow_missing_chunks is False
    with pytest.raises(ConfigError, match="allow_missing_chunks='yes' must be true or false"):
        parse_config({**BASE, "allow_missing_chunks": "yes"})


def test_the_device_follows_the_cluster():
    """``device: auto`` computes on the GPU on a LocalCUDACluster only; explicit values stay."""
    assert ClusterConfig(kind="cuda").compute_device == "gpu"
    assert ClusterConfig().compute_device == "cpu"
    assert ClusterConfig(kind="cuda", device="cpu").compute_device == "cpu"
    gpu = ClusterConfig(kind="address", address="tcp://127.0.0.1:8786", device="gpu")
    assert gpu.compute_device == "gpu"
