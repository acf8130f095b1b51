"""Every tuner and callback under DDP: ``torchrun --nproc_per_node 2`` (gloo, CPU, one thread each) on the tiny model.

One launch runs all cases of tests/distributed/_ddp_worker.py in sequence (the imports are paid once; the
launch takes about 35 s on 2 cores, the whole folder about a minute). For each case the two replicas must end with bit-identical adapter tensors (a hash of
what would be saved), only rank 0 may write the adapter, and the adapter must equal a single-process run
with the same global batch within the fp32 tolerance of tests/tolerances.py. A negative control (the LoRI
switch without the fixes) must diverge, and settings that differ per rank must be refused with one error.
The ``fsdp_*`` cases train every tuner under FSDP2 ``fully_shard`` (CPU, gloo) and save with ``save_adapter``.
Before the fixes, lori_switch, shira_grad, shira_grad_no_buffer_broadcast, shira_snip_abs and lors_init failed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from adapterlab.io import load_tensors
from tests.distributed._ddp_worker import CASES, FSDP_NAMES, _fsdp_cases, run_case, run_fsdp_case, tensor_hash
from tests.tolerances import TOL

REPO = Path(__file__).resolve().parents[2]
#: cases that must train identically on both ranks and match one process
GOOD = [
    "lori_switch",
    "lori_switch_static_reducer",
    "shira_random",
    "shira_grad",
    "shira_grad_no_buffer_broadcast",
    "shira_snip_abs",
    "dylora",
    "dylora_rslora",
    "snella",
    "spp_logger",
    "lors_init",
    "perp_mask_lora",
    "perp_full_mask_keeper",
]
#: cases refused on every rank with one clear error (the words it must contain)
REFUSED = {
    "shira_seed_per_rank": ["differs between the 2 processes", "rank 0:", "rank 1:", "random_seed"],
    "dylora_seed_per_rank": ["differs between the 2 processes", "rank 0:", "rank 1:", "seed"],
    "dylora_static_reducer": ["ddp_find_unused_parameters=True"],
}
CONTROL = "lori_switch_unsynced"


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "tests.distributed._ddp_worker", str(out), *GOOD, *REFUSED, CONTROL, *FSDP_NAMES]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out, json.loads((out / "results.json").read_text())


@pytest.fixture()
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun workers (OMP_NUM_THREADS=1)
    yield
    torch.set_num_threads(n)


def test_every_case_is_listed():
    assert set(GOOD) | set(REFUSED) | {CONTROL} == set(CASES)
    assert set(FSDP_NAMES) == set(_fsdp_cases())


@pytest.mark.parametrize("case", GOOD)
def test_replicas_identical_only_rank0_writes_and_equal_to_one_process(ddp, case, tmp_path, one_thread):
    out, results = ddp
    res = results[case]
    assert res["errors"] == [None, None], res["errors"]
    h0, h1 = res["hashes"]
    assert h0 == h1, f"{case}: the two replicas ended with different adapters"
    saved = load_tensors(out / case / "tensors.safetensors")
    assert tensor_hash(saved) == h0
    rank0, rank1 = out / case / "rank0", out / case / "rank1"
    if (rank0 / "adapter_model.safetensors").exists():  # Trainer.save_model (peft cases)
        assert tensor_hash(load_tensors(rank0 / "adapter_model.safetensors")) == h0
    assert not [p.name for p in rank1.iterdir() if p.is_file()], "rank 1 wrote files"
    assert len(res["logs"]) >= 4  # trained every step

    single = run_case(case, tmp_path, rank=0, world=1)
    assert single["error"] is None, single["error"]
    ref = single["tensors"]
    assert set(ref) == set(saved)
    for key, value in saved.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, ref[key], **TOL[torch.float32], msg=lambda m, k=key: f"{case} {k}: {m}")
        else:
            assert torch.equal(value, ref[key]), f"{case} {key}: the masks / indices differ from one process"
    assert single["initial_hash"] != single["hash"], f"{case}: nothing trained"
    if case == "spp_logger":
        assert all("base_sparsity" in h and "adapter_density" in h for h in res["logs"])
    if case == "perp_full_mask_keeper":
        assert res["mask_keeper"] is True


def test_the_unsynced_lori_switch_diverges(ddp):
    """Negative control: the D -> S switch without the fixes leaves two different adapters (issue 19)."""
    _, results = ddp
    res = results[CONTROL]
    assert res["errors"] == [None, None]
    assert res["hashes"][0] != res["hashes"][1]


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_settings_that_differ_per_rank_are_refused_on_every_rank(ddp, case):
    _, results = ddp
    errors = results[case]["errors"]
    assert all(e is not None for e in errors), errors
    for e in errors:
        for needle in REFUSED[case]:
            assert needle in e, e


@pytest.mark.parametrize("case", FSDP_NAMES)
def test_fsdp2_trains_and_save_adapter_writes_the_whole_adapter(ddp, case, tmp_path, one_thread):
    """FSDP2 (``fully_shard`` per decoder layer + root, gloo, CPU): the parameters are DTensor shards, peft's
    ``save_pretrained`` cannot write them; ``save_adapter`` gathers, writes on rank 0 and checks the file."""
    out, results = ddp
    res = results[case]
    assert res["errors"] == [None, None], res["errors"]
    h0, h1 = res["hashes"]
    assert h0 == h1, f"{case}: the gathered adapters differ between ranks"
    gathered = load_tensors(out / case / "tensors.safetensors")
    folder = out / case / "adapter"
    assert (folder / "adapter_config.json").is_file()
    assert tensor_hash(load_tensors(folder / "adapter_model.safetensors")) == h0, (
        "the saved adapter is not the whole one"
    )
    assert not [p.name for p in (out / case).iterdir() if ".stage-" in p.name], "a staging folder was left"

    single = run_fsdp_case(case, tmp_path, rank=0, world=1)
    assert single["error"] is None, single["error"]
    dtype = _fsdp_cases()[case][1]
    for key, value in gathered.items():
        if value.is_floating_point():
            torch.testing.assert_close(
                value, single["tensors"][key], **TOL[dtype], msg=lambda m, k=key: f"{case} {k}: {m}"
            )
        else:
            assert torch.equal(value, single["tensors"][key]), f"{case} {key}"
    assert (tmp_path / case / "adapter" / "adapter_model.safetensors").is_file()  # one process: save_pretrained + check


def test_an_fsdp2_adapter_loads_with_peft(ddp):
    from peft import PeftModel

    from adapterlab.models import tiny_llama

    out, _ = ddp
    model = PeftModel.from_pretrained(tiny_llama(), str(out / "fsdp_dylora" / "adapter"))
    saved = load_tensors(out / "fsdp_dylora" / "adapter" / "adapter_model.safetensors")
    from peft import get_peft_model_state_dict

    assert tensor_hash(get_peft_model_state_dict(model)) == tensor_hash(saved)


def test_under_fsdp2_the_lori_switch_and_mask_keeper_refuse_shards(ddp):
    """Both replace or mask whole parameters, which FSDP2 shards: one clear error instead of a wrong adapter."""
    _, results = ddp
    switch, keeper = results["fsdp_lori"]["refused"]
    assert switch is not None and "FSDP shard" in switch and "before sharding" in switch
    assert keeper is not None and "FSDP shard" in keeper
