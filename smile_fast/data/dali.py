"""NVIDIA DALI loaders: the same batches as data/torchvision.py, decoded and cropped by DALI.

On a GPU the JPEG decode runs on the device (`decoders.image(device="mixed")`: nvJPEG, with the
hardware decoder on A100/H100) and resize, crop, flip and normalization run as GPU kernels, so the
training step is not held back by 16 CPU cores doing PIL work. On a CPU-only machine the same
pipeline runs with CPU operators (`device_id=None`), which is how CI tests it.

What is shared with the torchvision path, so that the two cannot drift apart:
- the files and their order: an `external_source` fed from the TrainBatchPlan (training) or from
  the `samples[rank::world_size]` shard (evaluation), so `--resume` and several ranks work alike;
- the transform: built from the same TransformSpec. The output size of the resize and the crop
  window are computed in Python (data/crop_geometry.py) with torchvision's own rules (shorter side: the long side is
  truncated, `int(size * long / short)`; center crop: `int(round((size - crop) / 2))`; random crop:
  a uniform integer offset) and handed to DALI as per-sample arguments, so DALI crops exactly where
  torchvision could have. The random draws come from each sample's augmentation seed in the plan,
  so a seeded run repeats exactly;
- the files DALI would stop on: checked up front with images.check_images and skipped with a count.

On a CPU-only machine the resize runs in torch by default (`cpu_resize="torch"`): DALI decodes on its
threads and hands over the decoded images, and torch's uint8 antialiased bilinear resize (the same
filter as PIL's) does resize, crop and flip (data/host_crop.py). DALI's CPU resampler is its weak spot: on the 2-core CI
machine it takes about 3 ms per 500x375 -> 256x256 image where torch takes 0.32 ms, which made it
the bulk of the pipeline (measured with DALI 2.4 and torch 2.14). `cpu_resize="dali"` keeps the
all-DALI pipeline, the one that runs on a GPU, so CI tests that one too.

`fn.decoders.image_random_crop` is not used: it picks a random area and aspect ratio on the
*original* image (Inception-style RandomResizedCrop) and then resizes that, while the spec asks for a
fixed-size crop out of an image first resized to 256 (Resize -> RandomCrop 224). Emulating the
spec with a decoder ROI would change the border pixels (the resize filter would no longer see the
pixels just outside the window), so decode -> resize -> crop is kept: it is the spec.
"""

from __future__ import annotations

import functools
import logging
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from smile_fast.data.crop_geometry import CropWindow, crop_window, resized_size
from smile_fast.data.encoded_images import BatchReader
from smile_fast.data.host_crop import crop_on_host, normalize_on_host, one_torch_thread
from smile_fast.data.images import nothing_decodes
from smile_fast.data.sampler import TrainBatchPlan
from smile_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TransformSpec
from smile_fast.devices import to_device_async
from smile_fast.errors import UserError, raise_an_interrupt_inside

logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install -e ".[dali]" in the smile-fast checkout'  # as README says; quoted for zsh


@functools.cache
def dali_available() -> bool:
    """True when NVIDIA DALI and its PyTorch plugin import here."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception as error:  # a broken install raises more than ImportError (OSError on a missing library)
        raise_an_interrupt_inside(error)  # not cached: a Ctrl-C during the import is not a missing DALI
        return False
    return True


# Set by the pipeline itself (decoders.image's device, output type and orientation), not by an option.
_DECODER_SETTINGS_OWN = ("device", "output_type", "adjust_orientation")


def check_decoder_options(options: Mapping[str, object]) -> None:
    """A one-line UserError for a decoder option the GPU decoder would refuse when its pipeline is built: a name
    `decoders.image` does not take, or one the pipeline sets itself. On a GPU these ended as a KeyError or
    TypeError traceback; checked by name against DALI's own schema, so also on a CPU, where the options go unused
    (a review tried them on a CPU first and learnt nothing)."""
    from nvidia.dali import backend

    schema = backend.GetSchema("decoders__Image")
    for name in options:
        if name in _DECODER_SETTINGS_OWN:
            raise UserError(f"--dali-decoder-option {name} is set by the pipeline itself; leave it out")
        if not schema.HasArgument(name):
            raise UserError(
                f"--dali-decoder-option {name}: DALI's image decoder (decoders.image) has no such setting; see its "
                "documentation for the names (e.g. hw_decoder_load, jpeg_fancy_upsampling)"
            )


def require_dali() -> None:
    """Raise a one-line UserError with the install command when DALI is missing."""
    if not dali_available():
        raise UserError(
            f"the DALI loader needs NVIDIA DALI, which is not installed: {INSTALL_HINT} (or --loader torchvision)"
        )


def _relative_position(offset: int, size: int, crop: int) -> np.ndarray:
    """crop_mirror_normalize's crop_pos for an integer offset: DALI takes anchor = round(pos * (size - crop))."""
    return np.array(offset / (size - crop) if size > crop else 0.0, dtype=np.float32)


def _checked(samples: Sequence[tuple[str, int]]) -> tuple[list[tuple[str, int]], list[str]]:
    """images.check_images with the cache folder prepare_data uses (a second check only stats the files); logs skips."""
    from smile_fast.data.cache import image_checks_dir
    from smile_fast.data.images import check_images, skipped_message

    good, bad = check_images(list(samples), image_checks_dir())
    if bad:
        logger.warning("%s", skipped_message(bad))
    return good, bad


def _undecodable(paths: Sequence[str]) -> list[str]:
    """The files among `paths` that PIL cannot decode either (images.load_rgb, the torchvision loader's reader).

    The up-front check reads headers (and JPEG/PNG end markers), so a file damaged inside (a bad Huffman table,
    a truncated BMP, TIFF or GIF) reaches the decoder. DALI then stops its whole pipeline: the run ended with a
    traceback that named no file, and a resume stopped on it again (review). When that happens the loader
    looks for such files among the batches the pipeline was preparing, and leaves them out as the torchvision
    loader does."""
    from smile_fast.data.verify import decode_error

    return [path for path in dict.fromkeys(paths) if decode_error(path) is not None]


def _from_a_damaged_file(error: Exception) -> bool:
    """Whether `error` can come from a damaged file: DALI's decoder failing ("Failed to decode sample"), or PIL's,
    where the feeder re-encodes a format DALI cannot read (an OSError). Others (out of memory, say) are not
    searched for: that would decode a few hundred files with PIL before the real error is raised."""
    return isinstance(error, OSError) or "decode" in str(error).lower()


def _pipeline_failed(error: Exception, candidates: Sequence[str]) -> list[str]:
    """The files among `candidates` that made the pipeline fail with `error`; none (the caller re-raises it) for
    an error that is not a damaged file's."""
    bad = _undecodable(candidates) if _from_a_damaged_file(error) else []
    if bad:
        logger.warning(
            "skipping %d image file(s) that failed to decode (DALI stopped on them; their headers passed the "
            "up-front check), as the torchvision loader does: %s",
            len(bad),
            ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""),
        )
    return bad


# --- the pipeline -----------------------------------------------------------------------------------


def _resolve_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type not in ("cuda", "cpu"):
        raise UserError(f"the DALI loader runs on cpu or cuda devices, not {device.type!r}; use --loader torchvision")
    return device


CPU_RESIZES = ("torch", "dali")

# Settings of the GPU decoder (`decoders.image` on the "mixed" backend). jpeg_fancy_upsampling: nvJPEG
# rebuilds the subsampled chroma planes as libjpeg-turbo does by default (PIL, i.e. the torchvision
# path, and DALI's own CPU decoder) instead of with its cheaper default filter, which on textured
# images moves single R, G or B values by up to tens of grey levels. Other settings (hw_decoder_load,
# the share of each batch given to the A100/H100 hardware decoder, 0.65 in DALI 2.4) can be passed as
# `decoder_options`, e.g. from `smile-fast bench loader --dali-decoder-option hw_decoder_load=0.9`.
GPU_DECODER_DEFAULTS = {"jpeg_fancy_upsampling": True}


class _SampleFeeder:
    """Reads files and draws crop windows: (path, augment seed or None) -> (encoded bytes, CropWindow).

    It runs on the training loop's thread, so the files are read into reused memory (BatchReader): the
    arrays it returns stay valid for `depth` calls, and DALI copies them when it is fed.
    """

    def __init__(self, spec: TransformSpec, seed: int, depth: int = 3):
        self.spec = spec
        self.seed = seed
        self._reader = BatchReader(depth)

    def __call__(self, items: Sequence[tuple[str, int | None]]) -> tuple[list[np.ndarray], list[CropWindow]]:
        encoded_batch, windows = [], []
        read = self._reader.read([path for path, _ in items])
        for (encoded, height, width), (_, augment_seed) in zip(read, items, strict=True):
            out_height, out_width = resized_size(self.spec, height, width)
            draw_seed = None if augment_seed is None else augment_seed ^ self.seed
            top, left, mirror = crop_window(self.spec, out_height, out_width, draw_seed)
            encoded_batch.append(encoded)
            windows.append(CropWindow(out_height, out_width, top, left, mirror))
        return encoded_batch, windows


def _dali_window_columns(encoded: list[np.ndarray], windows: list[CropWindow], crop: int) -> tuple[list, ...]:
    """The all-DALI pipeline's per-sample inputs: bytes, resized height and width, relative crop position, flip."""
    return (
        encoded,
        [np.array(window.height, dtype=np.float32) for window in windows],
        [np.array(window.width, dtype=np.float32) for window in windows],
        [_relative_position(window.top, window.height, crop) for window in windows],
        [_relative_position(window.left, window.width, crop) for window in windows],
        [np.array(window.mirror, dtype=np.int32) for window in windows],
    )


def _check_cpu_resize(cpu_resize: str) -> None:
    if cpu_resize not in CPU_RESIZES:
        raise ValueError(f"cpu_resize must be one of {CPU_RESIZES}, got {cpu_resize!r}")


@dataclass(frozen=True)
class _PipelineSettings:
    """What a DALI loader's pipeline is built from (train and eval differ only in these values)."""

    spec: TransformSpec
    batch_size: int
    device: torch.device
    num_threads: int
    channels_last: bool
    output_uint8: bool
    seed: int
    prefetch_queue_depth: int
    cpu_resize: str
    decoder_options: tuple[tuple[str, object], ...] = ()  # GPU decoder only, over GPU_DECODER_DEFAULTS

    @property
    def resize_on_host(self) -> bool:
        """On a GPU DALI's resize is fast and the host must stay free: everything stays in DALI there."""
        return self.device.type == "cpu" and self.cpu_resize == "torch"


def _build_pipeline(source: Callable[[], object], settings: _PipelineSettings):
    """A built DALI pipeline with one output.

    With settings.resize_on_host, `source()` returns the batch's encoded bytes and the pipeline outputs
    the decoded uint8 [H, W, 3] images (the host does the rest, see data/host_crop.py).
    Otherwise `source()` returns _dali_window_columns and the output is the batch of crops: float32
    [B, 3, crop, crop] (or [B, crop, crop, 3] when channels_last or output_uint8), normalized unless
    output_uint8.
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    spec = settings.spec
    on_gpu = settings.device.type == "cuda"

    @pipeline_def(
        batch_size=settings.batch_size,
        num_threads=settings.num_threads,
        device_id=settings.device.index if on_gpu else None,
        seed=settings.seed,
        prefetch_queue_depth=settings.prefetch_queue_depth,
    )
    def pipeline():
        # adjust_orientation=False: load_rgb (the torchvision path) ignores EXIF orientation too.
        gpu_options = dict(GPU_DECODER_DEFAULTS, **dict(settings.decoder_options)) if on_gpu else {}
        decode = functools.partial(
            fn.decoders.image,
            device="mixed" if on_gpu else "cpu",
            output_type=types.RGB,
            adjust_orientation=False,
            **gpu_options,
        )
        if settings.resize_on_host:
            return decode(fn.external_source(source=source, batch=True))
        encoded, height, width, position_y, position_x, mirror = fn.external_source(
            source=source, num_outputs=6, batch=True
        )
        # Resize -> crop -> flip as one operator: DALI maps the crop window back through the resize and
        # resamples only that region, with the same pixels as resizing the whole image first (the
        # parity tests compare it with torchvision's Resize + crop). Linear with antialiasing is PIL's
        # bilinear filter (support widened by the scale when shrinking), which is what torchvision's
        # Resize does.
        images = fn.resize_crop_mirror(
            decode(encoded),
            resize_y=height,
            resize_x=width,
            crop=(spec.crop_size, spec.crop_size),
            crop_pos_x=position_x,
            crop_pos_y=position_y,
            mirror=mirror,
            interp_type=types.INTERP_LINEAR,
            antialias=True,
        )
        if settings.output_uint8:
            return images  # uint8 [crop, crop, 3] per sample: NHWC batches, normalized later by the fused op
        return fn.crop_mirror_normalize(
            images,
            dtype=types.FLOAT,
            mean=[255.0 * value for value in IMAGENET_MEAN],
            std=[255.0 * value for value in IMAGENET_STD],
            # HWC makes the batch NHWC, i.e. channels-last NCHW after a free permute.
            output_layout="HWC" if settings.channels_last else "CHW",
        )

    built = pipeline()
    built.build()
    return built


def _to_torch(batch, device: torch.device, channels_last: bool, output_uint8: bool) -> torch.Tensor:
    """Copy one DALI output batch into a fresh torch tensor on `device` (DALI reuses its buffers)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    dense = batch.as_tensor()
    target = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    feed_ndarray(dense, target, cuda_stream=stream)
    if output_uint8 or not channels_last:
        return target
    return target.permute(0, 3, 1, 2)


class _DaliBatches:
    """One DALI pipeline plus the host's share of the transform: `next()` gives (images, labels).

    `next_items()` returns the next batch as (path, label, augment seed or None) triples, in the order
    DALI asks for them (up to prefetch_queue_depth ahead of the consumer), and raises StopIteration
    when there are no more; the crop windows and labels wait in a queue for their decoded images.
    """

    def __init__(self, next_items: Callable[[], list[tuple[str, int, int | None]]], settings: _PipelineSettings):
        self.settings = settings
        self._pending: deque[tuple[list[CropWindow], list[int]]] = deque()
        # One more buffer than the batches DALI asks for ahead of the consumer.
        feeder = _SampleFeeder(settings.spec, settings.seed, depth=settings.prefetch_queue_depth + 1)
        crop = settings.spec.crop_size

        def source() -> object:
            items = next_items()
            encoded, windows = feeder([(path, augment_seed) for path, _, augment_seed in items])
            self._pending.append((windows, [label for _, label, _ in items]))
            return encoded if settings.resize_on_host else _dali_window_columns(encoded, windows, crop)

        self._pipeline = _build_pipeline(source, settings)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        settings = self.settings
        (output,) = self._pipeline.run()
        windows, labels = self._pending.popleft()
        if settings.resize_on_host:
            with one_torch_thread():
                images = crop_on_host(output, windows, settings.spec.crop_size)
                if not settings.output_uint8:
                    images = normalize_on_host(images, settings.channels_last)
        else:
            images = _to_torch(output, settings.device, settings.channels_last, settings.output_uint8)
        return images, to_device_async(torch.tensor(labels, dtype=torch.int64), settings.device)

    def close(self) -> None:
        self._pipeline = None


class DaliTrainLoader:
    """Training batches from DALI, read in the TrainBatchPlan's order.

    Same contract as data/torchvision.py's TorchvisionTrainLoader. `iterate(start)` yields, forever,
    (images, labels) for iterations start, start + 1, ...:
    images: float32 [B, 3, crop, crop] normalized with ImageNet mean/std, on `device`, channels-last
        (a permuted view of an NHWC buffer) when `channels_last`; with `output_uint8`, uint8
        [B, crop, crop, 3] (NHWC) unnormalized, for smile_fast.ops.mixup_normalize_uint8;
    labels: int64 [B] on `device`.

    num_workers: DALI CPU threads when `num_threads` is not given (the torchvision loader's worker count).
    pin_memory: accepted for the shared constructor shape; DALI writes straight to the device.
    seed: mixed into every sample's augmentation seed (0 keeps the plan's draws as they are) and
        given to the DALI pipeline.
    prefetch_queue_depth: batches DALI prepares ahead of the one being consumed.
    cpu_resize: on a CPU device, "torch" (default) resizes, crops and flips DALI's decoded images with
        torch; "dali" keeps the whole transform in DALI (the GPU pipeline's operators). See the
        module docstring for why.
    decoder_options: arguments of the GPU decoder (`decoders.image`, "mixed"), over
        GPU_DECODER_DEFAULTS; not used on a CPU device.

    Measured on the 2-core CI machine with the all-DALI pipeline (DALI 2.4, 500x375 JPEGs, batch 32):
    1, 2, 3 or 4 threads and a prefetch depth of 1, 2 or 4 made no difference above the run-to-run
    noise (about 10%), so the defaults stay.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        spec: TransformSpec,
        plan: TrainBatchPlan,
        device: torch.device | str,
        num_workers: int = 2,
        channels_last: bool = False,
        pin_memory: bool | None = None,
        *,
        num_threads: int | None = None,
        output_uint8: bool = False,
        seed: int = 0,
        prefetch_queue_depth: int = 2,
        cpu_resize: str = "torch",
        decoder_options: Mapping[str, object] | None = None,
    ):
        require_dali()
        if plan.num_samples != len(samples):
            raise ValueError(f"the plan covers {plan.num_samples} samples but {len(samples)} were given")
        _check_cpu_resize(cpu_resize)
        self.spec = spec
        self.plan = plan
        self.device = _resolve_device(device)
        self.num_threads = max(1, num_threads if num_threads is not None else num_workers)
        self.channels_last = channels_last
        self.output_uint8 = output_uint8
        self.seed = seed
        self.prefetch_queue_depth = prefetch_queue_depth
        self.cpu_resize = cpu_resize
        self.decoder_options = tuple(sorted((decoder_options or {}).items()))
        good, bad = _checked(samples)
        if not good:
            raise UserError(f"none of the {len(samples)} training images can be read; check the dataset files")
        self.skipped_files = len(bad)
        # The plan indexes the list it was built for, so a bad file keeps its slot and reads the next
        # readable sample of the list instead; batches keep their size and the plan stays valid.
        self._listed = list(samples)
        self._bad = set(bad)
        self._samples = self._fill_bad_slots(self._listed, self._bad)

    @staticmethod
    def _fill_bad_slots(samples: list[tuple[str, int]], bad: set[str]) -> list[tuple[str, int]]:
        if not bad:
            return samples
        count = len(samples)
        filled = list(samples)
        for index, (path, _) in enumerate(samples):
            if path in bad:
                step = 1
                while samples[(index + step) % count][0] in bad:
                    step += 1
                filled[index] = samples[(index + step) % count]
        return filled

    def _settings(self) -> _PipelineSettings:
        return _PipelineSettings(
            self.spec,
            self.plan.batch_size,
            self.device,
            self.num_threads,
            self.channels_last,
            self.output_uint8,
            self.seed,
            self.prefetch_queue_depth,
            self.cpu_resize,
            self.decoder_options,
        )

    def _leave_out(self, error: Exception, iteration: int) -> bool:
        """After the pipeline failed while preparing iteration `iteration` or the batches after it: leave out the
        damaged files among them (True), or find none (False: the error is not a file's)."""
        ahead = range(iteration, iteration + self.prefetch_queue_depth + 2)
        candidates = [self._samples[index][0] for number in ahead for index, _ in self.plan.batch(number)]
        bad = _pipeline_failed(error, candidates)
        if not bad:
            return False
        self._bad.update(bad)
        if len(self._bad) >= len(self._listed):
            raise nothing_decodes(len(self._listed))
        self.skipped_files += len(bad)
        self._samples = self._fill_bad_slots(self._listed, self._bad)
        return True

    @property
    def skipped_paths(self) -> set[str]:
        """The files skipped so far (failed the check or the decoder), by path: the ranks of a torchrun run each
        meet those of their own shard, and the summary counts their union."""
        return set(self._bad)

    def iterate(self, start_iteration: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) for iterations start_iteration, start_iteration + 1, ... (never ends)."""
        iteration = start_iteration
        while True:  # one pipeline, or a new one from the failed iteration without the files it failed on
            next_iteration = iteration

            def next_items() -> list[tuple[str, int, int | None]]:
                nonlocal next_iteration
                plan_batch = self.plan.batch(next_iteration)
                next_iteration += 1
                return [self._samples[index] + (augment_seed,) for index, augment_seed in plan_batch]

            batches = _DaliBatches(next_items, self._settings())
            try:
                while True:
                    try:
                        batch = batches.next()
                    except Exception as error:
                        if not self._leave_out(error, iteration):
                            raise
                        break
                    iteration += 1
                    yield batch
            finally:
                batches.close()


def dali_eval_batches(
    samples: Sequence[tuple[str, int]],
    spec: TransformSpec,
    batch_size: int,
    device: torch.device | str,
    num_workers: int = 2,
    rank: int = 0,
    world_size: int = 1,
    channels_last: bool = False,
    *,
    num_threads: int | None = None,
    output_uint8: bool = False,
    cpu_resize: str = "torch",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every readable image of this rank's shard `samples[rank::world_size]` exactly once, in order.

    Yields (images, labels): float32 [b, 3, crop, crop] normalized (channels-last view of NHWC when
    `channels_last`; uint8 [b, crop, crop, 3] with `output_uint8`) and int64 [b], on `device`, with
    b = batch_size except for a smaller last batch, which is kept: nothing is padded, so no image is
    counted twice. Unreadable files are skipped with a warning. cpu_resize: as for DaliTrainLoader.
    """
    require_dali()
    _check_cpu_resize(cpu_resize)
    device = _resolve_device(device)
    shard, _ = _checked(list(samples)[rank::world_size])
    threads = max(1, num_threads if num_threads is not None else num_workers)
    settings = _PipelineSettings(spec, batch_size, device, threads, channels_last, output_uint8, 0, 2, cpu_resize)
    remaining = shard  # not yet yielded
    while remaining:  # one pipeline, or a new one from the failed batch without the files it failed on
        batches = [remaining[start : start + batch_size] for start in range(0, len(remaining), batch_size)]
        queued = iter(batches)

        def next_items(queued=queued) -> list[tuple[str, int, int | None]]:
            return [(path, label, None) for path, label in next(queued)]  # StopIteration ends DALI's prefetch

        source = _DaliBatches(next_items, settings)
        try:
            for batch in batches:
                try:
                    output = source.next()
                except Exception as error:
                    ahead = remaining[: batch_size * (settings.prefetch_queue_depth + 2)]
                    bad = set(_pipeline_failed(error, [path for path, _ in ahead]))
                    if not bad:
                        raise
                    remaining = [sample for sample in remaining if sample[0] not in bad]
                    break
                remaining = remaining[len(batch) :]
                yield output
        finally:
            source.close()


# --- can DALI decode here? -------------------------------------------------------------------------------


def decode_problem(device: torch.device | str) -> str | None:
    """None when the DALI pipeline of this module decodes a JPEG on `device`, else why not, in one line.

    DALI can import and still be unable to decode on a GPU (nvJPEG or nvImageCodec missing or too old for
    the driver: the GPU wheels are separate packages). `--loader auto` asks this before choosing DALI,
    so that such a machine trains with torchvision instead of stopping at its first batch. The answer is
    cached per device: the probe builds and runs a pipeline once (about a second).
    """
    return _decode_problem(_resolve_device(device))


@functools.cache
def _decode_problem(device: torch.device) -> str | None:
    import tempfile
    from pathlib import Path

    from PIL import Image

    try:
        with tempfile.TemporaryDirectory() as folder:
            path = str(Path(folder) / "probe.jpg")
            Image.new("RGB", (40, 30), (200, 120, 40)).save(path, quality=90)
            spec = TransformSpec("square", resize_size=16, crop_size=8, train=False)
            items = iter([[(path, 0, None)]])
            settings = _PipelineSettings(
                spec,
                batch_size=1,
                device=device,
                num_threads=1,
                channels_last=False,
                output_uint8=False,
                seed=0,
                prefetch_queue_depth=1,
                cpu_resize="dali",  # on a CPU device too: the probe runs DALI's own operators
            )
            batches = _DaliBatches(lambda: next(items), settings)
            images, _ = batches.next()
            batches.close()
    except Exception as error:  # noqa: BLE001 - DALI reports a missing library as any of several errors
        raise_an_interrupt_inside(error)
        message = str(error).strip().splitlines()
        return f"{type(error).__name__}: {message[0] if message else 'no message'}"
    if tuple(images.shape) != (1, 3, 8, 8) or not torch.isfinite(images).all():
        return f"the probe batch came out wrong (shape {tuple(images.shape)})"
    return None
