"""Threads from the usable CPUs (affinity, cgroup quota, env override) and provider choice."""

from __future__ import annotations

import os

import pytest

from bge_onnx import InputError, ProviderError
from bge_onnx import session as S


def test_cgroup_v2_quota_caps_threads(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert S.usable_cpus(tmp_path) == min(len(os.sched_getaffinity(0)), 2)
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert S.usable_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert S.usable_cpus(tmp_path) == len(os.sched_getaffinity(0))


def test_cgroup_v1_quota(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert S.usable_cpus(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1")
    assert S.usable_cpus(tmp_path) == len(os.sched_getaffinity(0))


def test_affinity_is_respected(tmp_path):
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})
        assert S.usable_cpus(tmp_path) == 1
    finally:
        os.sched_setaffinity(0, before)


def test_threads_argument_env_and_errors(monkeypatch):
    monkeypatch.delenv(S.THREADS_ENV, raising=False)
    assert S.resolve_threads(None) == S.usable_cpus()
    assert S.resolve_threads(3) == 3
    monkeypatch.setenv(S.THREADS_ENV, "5")
    assert S.resolve_threads(None) == 5 and S.resolve_threads(2) == 2
    monkeypatch.setenv(S.THREADS_ENV, "many")
    with pytest.raises(InputError, match=r"\$BGE_ONNX_THREADS must be a positive int, got 'many'"):
        S.resolve_threads(None)
    with pytest.raises(InputError, match="threads must be a positive int, got 0"):
        S.resolve_threads(0)


def test_session_uses_the_thread_count(exported, monkeypatch):
    from bge_onnx import Embedder

    monkeypatch.setenv(S.THREADS_ENV, "1")
    assert Embedder(exported["bert-cls"], device="cpu")._model.session.threads == 1


def test_provider_choice():
    cpu, cuda = S.CPU, S.CUDA
    assert S.choose_providers("cpu", [cuda, cpu]) == [cpu]
    assert S.choose_providers("auto", [cuda, cpu]) == [cuda, cpu]
    assert S.choose_providers("auto", [cpu]) == [cpu]
    assert S.choose_providers("cuda", [cuda, cpu]) == [cuda, cpu]
    with pytest.raises(ProviderError, match=r"no CUDAExecutionProvider .*install the GPU build: .*pip install \./gpu"):
        S.choose_providers("cuda", [cpu], gpu=True)
    with pytest.raises(ProviderError, match="this machine shows no NVIDIA GPU .*run on the CPU"):
        S.choose_providers("cuda", [cpu], gpu=False)


def test_both_runtimes_installed_is_detected():
    assert S.conflicting_runtimes(["onnxruntime", "onnxruntime-gpu"])
    assert not S.conflicting_runtimes(["onnxruntime"])
    assert not S.conflicting_runtimes(["onnxruntime-gpu"])


def test_both_runtimes_installed_is_reported(monkeypatch):
    monkeypatch.setattr(S, "conflicting_runtimes", lambda installed=None: True)
    with pytest.warns(RuntimeWarning, match="both onnxruntime and onnxruntime-gpu are installed.*Fix: pip uninstall"):
        assert S.choose_providers("auto", [S.CPU]) == [S.CPU]
    with pytest.raises(ProviderError, match=r"they have overwritten each other; fix: "
                       r"pip uninstall -y bge-onnx bge-onnx-gpu onnxruntime onnxruntime-gpu && pip install \./gpu"):
        with pytest.warns(RuntimeWarning):
            S.choose_providers("cuda", [S.CPU], gpu=True)
