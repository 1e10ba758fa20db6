"""The notes a run says at its start, as a pure function of its settings (engine.Trainer logs them)."""

from __future__ import annotations

import pytest

from smile_fast.config import build_config
from smile_fast.setting_notes import setting_notes


def _notes(world_size=1, device_type="cuda", named=None, resuming=False, fast_bfloat16=True, **settings):
    config = build_config(overrides={"dataset": "demo", **settings})
    asked = []

    def has_fast_bfloat16():
        asked.append(True)
        return fast_bfloat16

    notes = setting_notes(config, device_type, world_size, named or {}, resuming, has_fast_bfloat16)
    return notes, bool(asked)


def test_a_plain_run_has_nothing_to_note_and_does_not_probe_the_cpu():
    assert _notes() == ([], False)
    assert _notes(device_type="cpu") == ([], False), "bfloat16 instructions matter only with --amp"


@pytest.mark.parametrize(
    ("world_size", "batch_size", "expected"),
    [
        (2, 32, "this run's global batch is 64 (--batch-size is per process: --batch-size 24 gives the paper's)"),
        (5, 32, "this run's global batch is 160 (--batch-size is per process)"),  # 48 is not 5 x anything
        (4, 12, None),  # 4 x 12 is the paper's 48
        (1, 32, None),  # one process: its batch is the user's choice, said by the flag itself
    ],
)
def test_several_processes_are_told_the_global_batch_against_the_papers(world_size, batch_size, expected):
    from smile_fast.config import TrainConfig

    config = TrainConfig(dataset="cub", data_dir="/data/cub", batch_size=batch_size)
    notes = setting_notes(config, "cuda", world_size, {}, False, lambda: True)
    paper = [note for note in notes if "the paper trains with a batch of 48" in note]
    assert (paper[0].split("; ")[-1] if paper else None) == expected, notes


def test_sync_bn_on_cpu_processes_and_amp_dtype_without_amp_are_noted():
    notes, _ = _notes(world_size=2, device_type="cpu", sync_bn=True)
    assert any("SyncBatchNorm is for GPUs; on CPU processes each BatchNorm normalizes over" in n for n in notes)
    assert not any("SyncBatchNorm" in n for n in _notes(world_size=2, sync_bn=True)[0]), "on GPUs it is what it says"
    notes, _ = _notes(amp_dtype="float16")
    assert notes == ["note: --amp-dtype float16 has no effect without --amp; this run trains in float32"]


def test_settings_the_method_never_reads_are_noted_on_a_new_run_only():
    notes, _ = _notes(method="finetune", named={"alpha": 0.4})
    assert notes == ["note: --method finetune does not use --alpha; the run trains without them"]
    assert _notes(method="finetune", named={"alpha": 0.4}, resuming=True)[0] == [], "said when the run started"


@pytest.mark.parametrize("fast", [False, True])
def test_amp_on_a_cpu_is_noted_only_without_bfloat16_instructions(fast):
    notes, asked = _notes(device_type="cpu", amp=True, fast_bfloat16=fast)
    assert asked
    assert [n for n in notes if "AVX512-BF16 or AMX" in n] == ([] if fast else [notes[0]])


def test_speed_flags_the_run_will_not_act_on_are_noted_as_bench_step_notes_them():
    # train recorded cudnn_benchmark: true on a CPU, and --compile-mode without --compile, without a word (review).
    notes, _ = _notes(device_type="cpu", cudnn_benchmark=True, compile_mode="max-autotune")
    assert notes == [
        "note: --compile-mode max-autotune has no effect without --compile; the run is eager",
        "note: --cudnn-benchmark is a CUDA setting; it has no effect on cpu",
    ]
    assert _notes(cudnn_benchmark=True, compile=True, compile_mode="max-autotune")[0] == []
