"""smile-fast: a fast, faithful SMILE fine-tuning trainer and its fused ops.

Where things are, lowest layer first (a module imports only from its own layer and those below it, and from the
leaves; tests/test_layering.py checks it):

kernels/        Triton kernels and their launchers
ops/            the public fused ops: torch.library registration, autograd, a plain-PyTorch reference for each
models.py       backbones with SMILE's heads, weights loading, BatchNorm folding
teacher.py      the mean teacher: EMA, the frozen BN-folded copy
fused_conv.py   the folded teacher's convolutions with bias, residual add and ReLU in one kernel
stem_conv.py    the folded teacher's stem as a Triton kernel of ours (--teacher-stem-kernel)
pointwise_conv.py  the folded teacher's 1x1 conv3 (bias, residual, ReLU) as a Triton kernel of ours
methods/        training objectives: finetune, mixup, cutmix, smile (batch, student, teacher -> loss)
data/           datasets from their official layouts, subset protocols, the demo, the loaders (DALI, torchvision),
                image checks, `data verify`

Engine level (may use any layer):
config.py         every setting: defaults, YAML, validation
setting_notes.py  the notes a run says at its start about settings that do less than one may think
step.py           one training iteration with the speed stack (AMP, channels-last, compile, fused SGD)
step_capture.py   that iteration captured as CUDA graphs (--cuda-graph)
engine.py         the loop: build, train, evaluate, checkpoint, stop
ranks.py          what the processes of a torchrun run say to each other
resume.py         a recorded run checked against a new invocation
evaluation.py     test top-1, and `smile-fast eval`
checkpoint.py     last.pt, written atomically, read without executing code
runlog.py         config.yaml, metrics.csv, summary.json, curves.png, the end-of-run table
run_lock.py       one process at a time writes a run folder
compile_cache.py  keeps torch.compile's caches from serving code of older ops
export.py         `smile-fast export`
predict.py        `smile-fast predict`
report.py         `smile-fast report`
bench_step.py     `smile-fast bench step`
output_files.py   where a command's output goes: --out/--json files, stdout
cli.py            the `smile-fast` subcommands and their arguments (__main__.py: `python -m smile_fast`)

Leaves (no policy of their own; any layer may use them): errors.py (user errors), torchrun.py (torchrun's
variables), devices.py (--device, the process group, non-blocking copies), atomic_file.py, folder_walk.py,
stop_signals.py, run_environment.py (the card, versions and command beside every figure), terminal.py (whether
stderr can show a progress bar).
"""

__version__ = "0.1.0"
