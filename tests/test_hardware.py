"""Hardware-dependent defaults: precision, channels_last and workers chosen from the machine, with the
capability faked both ways, and what a run records of the choice."""

from __future__ import annotations

import json

import pytest
import torch

import train
from classifier import hardware
from classifier.checkpoint import load_checkpoint
from classifier.cli import parse_cli

CPU = torch.device("cpu")
CUDA = torch.device("cuda:0")


@pytest.fixture
def native_bf16(monkeypatch):
    """Make this CPU look like one with AMX and oneDNN's bf16 kernels on."""
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "avx512f", "amx_bf16"})
    monkeypatch.setattr(hardware, "onednn_bf16_enabled", lambda: True)


@pytest.fixture
def avx2_only(monkeypatch):
    """Make this CPU look like an AVX2-only one (oneDNN would still claim bf16 support on AVX-512)."""
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx", "avx2", "fma"})
    monkeypatch.setattr(hardware, "onednn_bf16_enabled", lambda: True)


def test_auto_picks_bf16_only_where_the_cpu_has_it(native_bf16):
    choice = hardware.resolve_precision("auto", CPU)
    assert choice.value == "bf16" and "amx_bf16" in choice.reason and not choice.warn


def test_auto_picks_fp32_on_an_avx2_cpu(avx2_only):
    choice = hardware.resolve_precision("auto", CPU)
    assert choice.value == "fp32" and "no avx512_bf16 or amx_bf16" in choice.reason and not choice.warn


def test_native_flags_without_onednn_bf16_mean_fp32(monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX2 on an AMX CPU: the flags are there, the fast kernels are not."""
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.setattr(hardware, "onednn_bf16_enabled", lambda: False)
    choice = hardware.resolve_precision("auto", CPU)
    assert choice.value == "fp32" and "ONEDNN_MAX_CPU_ISA" in choice.reason


def test_explicit_bf16_on_an_avx2_cpu_is_kept_with_its_cost(avx2_only):
    choice = hardware.resolve_precision("bf16", CPU)
    assert choice.value == "bf16" and choice.warn
    assert "12x with AVX2 only" in choice.reason and "--precision auto or fp32" in choice.reason


def test_explicit_precision_is_kept(native_bf16):
    for asked in ("fp32", "bf16", "fp16"):
        choice = hardware.resolve_precision(asked, CPU)
        assert (choice.value, choice.reason, choice.warn) == (asked, "asked", False)


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")],
)
def test_auto_on_cuda_follows_the_compute_capability(capability, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    choice = hardware.resolve_precision("auto", CUDA)
    assert choice.value == expected and f"{capability[0]}.{capability[1]}" in choice.reason


def test_bf16_asked_on_a_pre_ampere_gpu_warns(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    choice = hardware.resolve_precision("bf16", CUDA)
    assert choice.value == "bf16" and choice.warn and "use fp16" in choice.reason


def test_cpu_flags_fall_back_to_proc_cpuinfo(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse2 avx2 amx_bf16\n")
    monkeypatch.setattr(hardware, "CPUINFO", cpuinfo)
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    assert hardware.cpu_flags() == {"fpu", "sse2", "avx2", "amx_bf16"}
    assert hardware.cpu_model() == "Test CPU 9000"


def test_torch_reading_of_the_flags_is_used_when_there(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True, "amx_bf16": False, "l2": 4096})
    assert hardware.cpu_flags() == {"avx2"}


def test_channels_last(monkeypatch):
    assert hardware.resolve_channels_last("auto", CPU, "fp32").value is True
    assert hardware.resolve_channels_last("auto", CUDA, "bf16").value is True
    assert hardware.resolve_channels_last("auto", CUDA, "fp32").value is False
    assert hardware.resolve_channels_last("off", CPU, "bf16").value is False
    assert hardware.resolve_channels_last("on", CUDA, "fp32").value is True


def test_workers_follow_the_cores(monkeypatch):
    monkeypatch.setattr(hardware, "usable_cores", lambda: 2)
    assert hardware.resolve_num_workers("auto", processes_per_node=1).value == 2
    assert hardware.resolve_num_workers("auto", processes_per_node=4).value == 1
    monkeypatch.setattr(hardware, "usable_cores", lambda: 64)
    assert hardware.resolve_num_workers("auto", processes_per_node=2).value == 4
    monkeypatch.setattr(hardware, "usable_cores", lambda: 2)
    too_many = hardware.resolve_num_workers(8, processes_per_node=1)
    assert too_many.value == 8 and too_many.warn
    assert hardware.resolve_num_workers(0, processes_per_node=1).value == 0


def test_the_training_loader_has_no_workers_on_a_cpu_the_step_fills(monkeypatch):
    monkeypatch.setattr(hardware, "usable_cores", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    auto = hardware.resolve_num_workers("auto", processes_per_node=1)
    chosen = hardware.resolve_train_loader_workers("auto", auto, CPU, processes_per_node=1)
    assert (auto.value, chosen.value) == (2, 0) and "2 threads fill" in chosen.reason
    # Any other case keeps num_workers: a GPU does the step; a number asked for is kept.
    assert hardware.resolve_train_loader_workers("auto", auto, CUDA, processes_per_node=1).value == 2
    asked = hardware.resolve_num_workers(2, processes_per_node=1)
    assert hardware.resolve_train_loader_workers(2, asked, CPU, processes_per_node=1).value == 2
    # The step on one thread (OMP_NUM_THREADS=1, as torchrun sets) leaves a core to a worker.
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert hardware.resolve_train_loader_workers("auto", auto, CPU, processes_per_node=1).value == 2
    # More cores than two: workers, as num_workers says.
    monkeypatch.setattr(hardware, "usable_cores", lambda: 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    auto = hardware.resolve_num_workers("auto", processes_per_node=1)
    assert hardware.resolve_train_loader_workers("auto", auto, CPU, processes_per_node=1).value == 4
    # Two cores per process under torchrun, both running the step: none.
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    auto = hardware.resolve_num_workers("auto", processes_per_node=4)
    assert hardware.resolve_train_loader_workers("auto", auto, CPU, processes_per_node=4).value == 0


def test_a_two_core_run_loads_training_batches_in_the_process(monkeypatch, fmnist_small_root, tmp_path):
    """With --data.num-workers auto on a 2-core CPU: the training loader has no workers, validation two,
    and config.json says so with the reason."""
    monkeypatch.setattr(hardware, "usable_cores", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    workers = []  # of each loader train.py makes, in order
    make_loader = train.data.make_loader

    def recording_make_loader(dataset, sampler, **kwargs):
        workers.append(kwargs["num_workers"])
        return make_loader(dataset, sampler, **kwargs)

    monkeypatch.setattr(train.data, "make_loader", recording_make_loader)
    train.main(tiny_run(fmnist_small_root, tmp_path, "two-cores", "--data.num-workers", "auto"))
    resolved = json.loads((tmp_path / "two-cores" / "config.json").read_text())["resolved"]
    assert resolved["num_workers"]["value"] == 2
    assert resolved["train_loader_workers"]["requested"] == "auto"
    assert resolved["train_loader_workers"]["value"] == 0
    assert workers[:2] == [0, 2]  # the training loader, then validation's


def tiny_run(root, out, name, *extra):
    """Two batches of small_resnet at 32 px: some of these runs train in bf16, which a CPU without native
    bf16 emulates (12x slower than fp32 with AVX2 only), so the model and images are kept small."""
    return parse_cli(
        [
            "--model", "small_resnet",
            "--data.image-size", "32",
            "--data.root", str(root),
            "--out-dir", str(out),
            "--name", name,
            "--epochs", "1",
            "--data.batch-size", "16",
            "--data.max-train-batches", "2",
            "--data.num-workers", "0",
            "--no-progress",
            *extra,
        ]
    )  # fmt: skip


@pytest.mark.parametrize(("kind", "expected"), [("native_bf16", "bf16"), ("avx2_only", "fp32")])
def test_a_run_records_what_auto_chose(kind, expected, request, fmnist_small_root, tmp_path, capsys):
    request.getfixturevalue(kind)
    train.main(tiny_run(fmnist_small_root, tmp_path, kind))
    config = json.loads((tmp_path / kind / "config.json").read_text())
    resolved = config["resolved"]["precision"]
    assert (resolved["requested"], resolved["value"]) == ("auto", expected)
    assert config["precision"] == "auto"  # the config as asked, resolved values beside it
    assert config["machine"]["usable_cores"] >= 1 and "cpu" in config["machine"]
    assert load_checkpoint(tmp_path / kind)["precision"] == expected
    assert f"precision {expected}: auto:" in capsys.readouterr().out


def test_emulated_bf16_is_a_printed_warning(avx2_only, fmnist_small_root, tmp_path, capsys):
    train.main(tiny_run(fmnist_small_root, tmp_path, "slow", "--precision", "bf16"))
    out = capsys.readouterr().out
    assert "warning: precision bf16: asked, but" in out and "slower than fp32" in out


def test_resume_refuses_another_precision(monkeypatch, fmnist_small_root, tmp_path):
    """A run that trained in bf16 and resumes where auto means fp32 is refused, unless accepted."""
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"amx_bf16"})
    monkeypatch.setattr(hardware, "onednn_bf16_enabled", lambda: True)
    train.main(tiny_run(fmnist_small_root, tmp_path, "moved"))
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2"})
    with pytest.raises(SystemExit, match="trained in bf16 and would continue in fp32"):
        train.main(parse_cli(["--resume", str(tmp_path / "moved")]))
    train.main(parse_cli(["--resume", str(tmp_path / "moved"), "--epochs", "2", "--accept-config-changes"]))
    assert load_checkpoint(tmp_path / "moved")["precision"] == "fp32"
