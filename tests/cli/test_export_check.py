"""`adapterlab export` and `adapterlab check --for vllm` through typer's CliRunner: every kind exported
--for vllm passes the pre-flight, each violation is caught (one crafted adapter per violation), and bad
input is one line, exit code 2 and nothing on disk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from adapterlab.cli.app import app
from tests.extraction._export_kinds import DENSE, KINDS, make_adapter, rel, true_deltas, written_deltas

runner = CliRunner()
SERVED = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli-export")


def _export(root: Path, src: Path, out: Path, *extra: str) -> object:
    return runner.invoke(
        app, ["export", str(src), "--to", "lora", "-o", str(out), "--base", str(root / "base"), *extra]
    )


def _check(folder: Path, *extra: str) -> object:
    return runner.invoke(app, ["check", "--for", "vllm", str(folder), *extra])


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_exported_for_vllm_passes_the_check(root: Path, kind: str) -> None:
    src = make_adapter(kind, root, torch.bfloat16 if kind in ("lora", "snell") else torch.float32)
    out = root / f"vllm-{kind}"
    extra = ["--energy", "0.95"] if kind in DENSE else []
    res = _export(root, src, out, "--for", "vllm", "--served-name", SERVED, *extra)
    assert res.exit_code == 0, res.output
    assert "total relative error" in res.output and (out / "export_report.json").is_file()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] in (1, 8, 16, 32, 64) and cfg["base_model_name_or_path"] == SERVED
    report = json.loads((out / "export_report.json").read_text())
    true = true_deltas(src, root / "base")
    got = written_deltas(out)
    for row in report["modules"]:  # the JSON error is the brute-force error of what was written
        tol = 2e-2 if kind in ("lora", "snell") else 1e-4
        assert abs(rel(got[row["name"]], true[row["name"]]) - row["error"]) < tol
    res = _check(out, "--served-name", SERVED, "--base", str(root / "base"), "--max-lora-rank", "64")
    assert res.exit_code == 0, res.output
    assert res.output.strip().startswith("ok:") and res.output.strip().count("\n") == 0


def test_check_passes_the_base_name_given_as_the_base_folder(root: Path) -> None:
    src = make_adapter("lora", root)
    out = root / "byname"
    assert _export(root, src, out, "--for", "vllm").exit_code == 0  # the adapter records the base folder
    res = _check(out, "--base", str(root / "base"))
    assert res.exit_code == 0, res.output


def _good(root: Path, name: str) -> Path:
    """A fresh copy of a servable export to break in one way."""
    src = root / "good"
    if not src.exists():
        res = _export(root, make_adapter("lora", root), src, "--for", "vllm", "--served-name", SERVED)
        assert res.exit_code == 0, res.output
    dst = root / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder: Path, **changes: object) -> None:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def _edit_tensors(folder: Path, fn) -> None:
    path = folder / "adapter_model.safetensors"
    t = load_file(str(path))
    save_file(fn(t), str(path), metadata={"format": "pt"})


def _violations(res) -> list[str]:
    assert res.exit_code == 2, res.output
    return [line for line in res.output.strip().splitlines() if line.strip()]


def test_violation_modules_to_save(root: Path) -> None:
    f = _good(root, "v-mts")
    _edit_config(f, modules_to_save=["lm_head"])
    (line,) = _violations(_check(f))
    assert "modules_to_save is ['lm_head']" in line


def test_violation_bias(root: Path) -> None:
    f = _good(root, "v-bias")
    _edit_config(f, bias="all")
    (line,) = _violations(_check(f))
    assert "bias is 'all': vLLM allows only 'none'" in line


def test_violation_dora(root: Path) -> None:
    f = _good(root, "v-dora")
    _edit_config(f, use_dora=True)
    (line,) = _violations(_check(f))
    assert "use_dora is true" in line


def test_violation_rank_above_max_lora_rank(root: Path) -> None:
    f = _good(root, "v-max")
    res = _check(f, "--max-lora-rank", "1")
    (line,) = _violations(res)
    assert "r is 8: above --max-lora-rank 1" in line


def test_violation_rank_not_in_vllms_set(root: Path) -> None:
    f = root / "v-set"
    shutil.rmtree(f, ignore_errors=True)
    res = _export(root, make_adapter("lora", root), f)  # not --for vllm: rank 4 stays 4
    assert res.exit_code == 0, res.output
    lines = _violations(_check(f))
    assert len(lines) == 1 and "r is 4: not one of vLLM's ranks 1, 8, 16" in lines[0]


def test_violation_target_module_the_base_lacks(root: Path) -> None:
    f = _good(root, "v-target")

    def rename(t):
        return {k.replace("layers.1.self_attn.q_proj", "layers.1.self_attn.nope_proj"): v for k, v in t.items()}

    _edit_tensors(f, rename)
    assert _check(f).exit_code == 0  # without the base nothing tells
    (line,) = _violations(_check(f, "--base", str(root / "base"), "--served-name", SERVED))
    assert "module 'model.layers.1.self_attn.nope_proj' is not a Linear or Embedding layer of the base" in line


def test_violation_vocabulary_other_than_the_bases(root: Path) -> None:
    from peft import LoraConfig, get_peft_model

    from adapterlab.models import tiny_llama

    f = root / "v-vocab"
    shutil.rmtree(f, ignore_errors=True)
    pm = get_peft_model(tiny_llama(vocab_size=96), LoraConfig(r=8, target_modules=["embed_tokens", "lm_head"]))
    pm.save_pretrained(str(f), save_embedding_layers=False)
    _edit_config(f, base_model_name_or_path=SERVED)
    assert _check(f, "--served-name", SERVED).exit_code == 0
    lines = _violations(_check(f, "--base", str(root / "base"), "--served-name", SERVED))
    assert len(lines) == 2
    assert all("covers a vocabulary of 96 but the base's is 128" in line for line in lines)


def test_violation_non_finite_tensor(root: Path) -> None:
    f = _good(root, "v-nan")

    def poison(t):
        key = sorted(t)[0]
        t[key] = t[key].clone()
        t[key].view(-1)[0] = float("nan")
        return t

    _edit_tensors(f, poison)
    (line,) = _violations(_check(f))
    assert "holds 1 NaN/Inf value(s)" in line


def test_violation_base_name(root: Path) -> None:
    f = _good(root, "v-name")
    (line,) = _violations(_check(f, "--served-name", "other/model"))
    assert f"base_model_name_or_path is '{SERVED}' but the served base is 'other/model'" in line


def test_violation_not_a_lora(root: Path) -> None:
    lines = _violations(_check(make_adapter("shira", root)))
    assert any("peft_type is 'ADAPTERLAB_SHIRA': vLLM serves plain LoRA only" in line for line in lines)


def test_several_violations_one_line_each(root: Path) -> None:
    f = _good(root, "v-many")
    _edit_config(f, bias="lora_only", use_dora=True, modules_to_save=["embed_tokens"])
    assert len(_violations(_check(f, "--served-name", "x"))) == 4


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--to", "gguf"], "--to 'gguf': choose one of: lora"),
        (["--for", "tgi"], "--for 'tgi': choose one of: vllm"),
        (["--rank", "0"], "--rank must be a positive integer"),
        (["--energy", "1.5"], "--energy must be in (0, 1]"),
        (["--rank", "4", "--energy", "0.5"], "give at most one of them"),
        (["--max-error", "0.01", "--rank", "1"], "is above --max-error 0.01"),
        (["--member", "x"], "is not a shared-basis bundle"),
        (["--task", "x"], "is not an RMM merge"),
    ],
)
def test_bad_export_input_is_one_line_exit_2_nothing_written(root: Path, args: list[str], needle: str) -> None:
    out = root / "never"
    res = _export(root, make_adapter("rslora", root), out, *args)
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert needle in text, res.output
    lines = res.output.strip().splitlines()  # a progress bar may precede a failure found while converting
    assert lines[-1].startswith("error:") and sum(line.startswith("error:") for line in lines) == 1
    assert not out.exists()


def test_bad_export_sources_exit_2(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    cases = [
        ([str(tmp_path / "missing")], "does not exist"),
        ([str(make_adapter("shira", root))], "delta is not low rank: give --rank R"),
        ([str(make_adapter("dylora", root)), "--rank", "9"], "[r_min, r] = [1, 6]"),
    ]
    for argv, needle in cases:
        res = runner.invoke(app, ["export", *argv, "-o", str(out), "--base", str(root / "base")])
        assert res.exit_code == 2, res.output
        assert needle in " ".join(res.output.split()), res.output
        assert not out.exists()
    mts = tmp_path / "mts"
    shutil.copytree(make_adapter("lora", root), mts)
    _edit_config(mts, modules_to_save=["lm_head"])
    res = runner.invoke(app, ["export", str(mts), "-o", str(out)])
    assert res.exit_code == 2 and "modules_to_save=['lm_head']" in res.output and not out.exists()
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (tmp_path / "pickle" / "adapter_model.bin").write_bytes(b"\x80\x04junk")
    res = runner.invoke(app, ["export", str(tmp_path / "pickle"), "-o", str(out)])
    assert res.exit_code == 2 and "pickle" in res.output and not out.exists()
    res = _check(tmp_path / "pickle")
    assert res.exit_code == 2 and "pickle" in res.output


def test_bad_check_input_exit_2(root: Path, tmp_path: Path) -> None:
    f = _good(root, "c-bad")
    for argv, needle in [
        (["check", "--for", "sglang", str(f)], "--for 'sglang': choose one of: vllm"),
        (["check", "--for", "vllm", str(f), "--max-lora-rank", "10"], "--max-lora-rank 10: vLLM allows one of"),
        (["check", "--for", "vllm", str(tmp_path / "none")], "does not exist"),
    ]:
        res = runner.invoke(app, argv)
        assert res.exit_code == 2, res.output
        assert needle in " ".join(res.output.split()), res.output


def test_vllms_own_peft_helper_agrees(root: Path) -> None:
    """vLLM's real PEFTHelper / LoRAConfig (when vLLM is importable, e.g. a ``pip install --no-deps vllm``
    test environment): every export --for vllm is legal with the scale adapterlab meant, and the crafted
    violations vLLM itself checks are refused by both."""
    peft_helper = pytest.importorskip("vllm.lora.peft_helper")
    lora_config = pytest.importorskip("vllm.config.lora")
    from adapterlab.jobs.check import check_vllm

    cfg = lora_config.LoRAConfig(max_lora_rank=64)
    for kind, extra in (("lora", []), ("dylora", ["--rank", "3"]), ("shira", ["--energy", "0.9"])):
        out = root / f"vllm-helper-{kind}"
        shutil.rmtree(out, ignore_errors=True)
        res = _export(root, make_adapter(kind, root), out, "--for", "vllm", "--served-name", SERVED, *extra)
        assert res.exit_code == 0, res.output
        helper = peft_helper.PEFTHelper.from_local_dir(str(out), max_position_embeddings=256)
        helper.validate_legal(cfg)  # raises on anything vLLM refuses
        written = json.loads((out / "adapter_config.json").read_text())
        assert helper.vllm_lora_scaling_factor == pytest.approx(written["lora_alpha"] / written["r"], rel=1e-12)
        assert check_vllm(out, served_name=SERVED, max_lora_rank=64) == []
    for name, change in (
        ("mts", {"modules_to_save": ["lm_head"]}),
        ("dora", {"use_dora": True}),
        ("bias", {"bias": "all"}),
        ("rank", {"r": 128}),
    ):
        f = _good(root, f"vllm-helper-bad-{name}")
        _edit_config(f, **change)
        with pytest.raises(ValueError):
            peft_helper.PEFTHelper.from_local_dir(str(f), max_position_embeddings=256).validate_legal(cfg)
        assert check_vllm(f, max_lora_rank=64) != []
