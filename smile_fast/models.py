"""Backbones that expose the feature map, the pooled vector and SMILE's two heads; weights loading;
BatchNorm folding for the frozen teacher.

The student (`SmileNet`) returns everything SMILE needs from one forward pass, so no forward hooks
are needed to reach the feature map (the authors' code uses hooks; hooks break `torch.compile`
graphs and cost a Python call per step).
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from smile_fast.checkpoint import safe_load
from smile_fast.errors import UserError, first_line
from smile_fast.terminal import shows_a_bar

# torchvision constructor name -> (weights enum name, name of the last Linear in the model).
# IMAGENET1K_V1 is the weight set the paper's ResNet-50 results were produced with (76.1% top-1),
# not the newer V2 recipe, so `--weights imagenet` loads V1 for faithfulness.
SUPPORTED_MODELS = {
    "resnet18": ("ResNet18_Weights", "IMAGENET1K_V1"),
    "resnet34": ("ResNet34_Weights", "IMAGENET1K_V1"),
    "resnet50": ("ResNet50_Weights", "IMAGENET1K_V1"),
    "resnet101": ("ResNet101_Weights", "IMAGENET1K_V1"),
    "efficientnet_b4": ("EfficientNet_B4_Weights", "IMAGENET1K_V1"),
}


@dataclass
class StudentOutput:
    """features [B, C, H, W]; pooled [B, C]; logits [B, num_classes] (fc1);
    aux_logits [B, num_source] (fc2), or None for a student built without the auxiliary head."""

    features: torch.Tensor
    pooled: torch.Tensor
    logits: torch.Tensor
    aux_logits: torch.Tensor | None


class Backbone(nn.Module):
    """The convolutional trunk of a torchvision classifier and what lies between it and the classifier.

    forward: image [B, 3, H, W] -> SMILE's feature map [B, C, h, w], the map L_fe compares (ResNet's
    layer4 output; EfficientNet's last MBConv block, the authors' `_blocks.31`, 448 channels for B4).
    pool: feature map -> the classifier's input [B, feature_dim]: the `neck` (EfficientNet's 1x1 head
    convolution to 1792 channels; none for ResNets), then the global average pool.
    head_dropout: the dropout the source model applies before its classifier (0.4 for EfficientNet-B4,
    none for ResNets); the student applies it before both heads while training, as the authors' code does.
    """

    def __init__(self, trunk: nn.Module, feature_dim: int, neck: nn.Module | None = None, head_dropout: float = 0.0):
        super().__init__()
        self.trunk = trunk
        self.neck = neck
        self.feature_dim = feature_dim
        self.head_dropout = head_dropout

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        if self.neck is not None:
            features = self.neck(features)
        return features.mean(dim=(2, 3))


class SmileNet(nn.Module):
    """Student: backbone, pool, fc1 (new target head) and fc2 (auxiliary source head).

    fc2 starts as a copy of the pre-trained model's own classifier and is trained (SMILE_SPEC.md);
    only fc1 is used for evaluation. Methods that never read fc2 (finetune, mixup, cutmix) build the
    student without it (`source_head=None`), so that every parameter takes part in every step: DDP
    then needs no unused-parameter search, and no dead weights sit in the optimizer.
    """

    def __init__(self, backbone: Backbone, num_classes: int, source_head: nn.Linear | None):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(backbone.head_dropout) if backbone.head_dropout > 0 else None
        self.fc1 = nn.Linear(backbone.feature_dim, num_classes)
        self.fc2 = copy.deepcopy(source_head) if source_head is not None else None

    def _head_input(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.dropout(pooled) if self.dropout is not None else pooled

    def forward(self, images: torch.Tensor) -> StudentOutput:
        features = self.backbone(images)
        pooled = self.backbone.pool(features)
        head_input = self._head_input(pooled)
        aux_logits = self.fc2(head_input) if self.fc2 is not None else None
        return StudentOutput(features, pooled, self.fc1(head_input), aux_logits)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Target-class logits [B, num_classes], the only output used at evaluation."""
        return self.fc1(self._head_input(self.backbone.pool(self.backbone(images))))


class SourceNet(nn.Module):
    """The pre-trained model itself (backbone + its original fc); the mean teacher is one of these."""

    def __init__(self, backbone: Backbone, fc: nn.Linear):
        super().__init__()
        self.backbone = backbone
        self.fc = fc

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (feature map [B, C, h, w], source logits [B, num_source])."""
        features = self.backbone(images)
        return features, self.fc(self.backbone.pool(features))


def split_torchvision(model: nn.Module, name: str) -> tuple[Backbone, nn.Linear]:
    """Cut a torchvision classifier into (trunk up to the last feature map, final Linear)."""
    if name.startswith("resnet"):
        trunk = nn.Sequential(
            model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3, model.layer4
        )
        return Backbone(trunk, model.fc.in_features), model.fc
    if name.startswith("efficientnet"):
        # The authors hook `_blocks.31`, the last MBConv block, for L_fe: features[:-1] here; the 1x1 head
        # convolution (features[-1]) runs between it and the pool. Their forward keeps the dropout before fc.
        dropout, linear = model.classifier
        trunk = nn.Sequential(*list(model.features)[:-1])
        return Backbone(trunk, linear.in_features, neck=model.features[-1], head_dropout=dropout.p), linear
    raise UserError(f"unsupported model {name!r}; choose one of: {', '.join(SUPPORTED_MODELS)}")


def _cached_weights_file(weights) -> Path:
    """Where torch.hub keeps the file of a torchvision weights enum."""
    filename = os.path.basename(weights.url)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _clean_state_dict(loaded) -> dict[str, torch.Tensor]:
    """Accept a bare state_dict or the common wrappers ({'state_dict': ...}, {'model': ...}); drop DDP prefixes."""
    if isinstance(loaded, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in loaded and isinstance(loaded[key], dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise UserError(
            "the weights file does not hold a state_dict of tensors; save it with torch.save(model.state_dict())"
        )
    return {k.removeprefix("module."): v for k, v in loaded.items()}


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a local state_dict safely: `weights_only=True` refuses pickles that would run code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist; pass --weights imagenet, none, auto or a state_dict path")
    loaded = safe_load(path, "weights file")
    return _clean_state_dict(loaded)


@contextlib.contextmanager
def _silenced():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def build_source_model(
    name: str,
    weights: str = "auto",
    log=print,
    source_classes: int = 1000,
    quiet: bool = False,
    fetch: bool = True,
    random_init_fallback: bool = True,
) -> tuple[nn.Module, str]:
    """Build a torchvision classifier with the requested weights.

    weights: "imagenet" (torchvision's weights API and cache; fails if neither cached nor downloadable),
      "auto" (ImageNet when cached or downloadable, else one line saying so and random init),
      "none" (random init) or a path to a local state_dict (a 365-way Places365 head is accepted).
    source_classes: the size of the source head with "none" (a checkpoint's weights are loaded into it next).
    quiet: nothing from torch.hub (its "Downloading: ..." line, on stdout, and its bar), for the processes of a run
      that are not its main one (under torchrun each printed its own).
    fetch: False reads torchvision's weights from the cache only (a process whose machine's first process fetched
      them already, or failed to): not there is a failed download.
    random_init_fallback: False makes "auto" without ImageNet weights an error, as "imagenet" is (the trainer's
      choice for the paper's datasets, whose runs from random init end far below the paper's numbers).
    Returns (model, description of the weights actually loaded).
    """
    import torchvision

    if name not in SUPPORTED_MODELS:
        raise UserError(f"unsupported model {name!r}; choose one of: {', '.join(SUPPORTED_MODELS)}")
    enum_name, member = SUPPORTED_MODELS[name]
    tv_weights = getattr(getattr(torchvision.models, enum_name), member)

    if weights in ("imagenet", "auto"):
        cached = _cached_weights_file(tv_weights).is_file()
        try:
            if not fetch and not cached:
                raise FileNotFoundError("not in the cache after this machine's first process fetched them")
            bar = shows_a_bar(sys.stderr) and not quiet
            # torchvision initializes the model at random before it reads the weights. Not from the run's random
            # stream: when the download then fails, the fallback below must start where `--weights none` does,
            # the setting config.yaml records for such a run (its `train -c` repeat started elsewhere: review).
            # torch.hub writes its "Downloading: ... to PATH" line to stdout, where a run's table and a script's parse
            # of it go. It is held and said on stderr, with the other messages, once the download has worked: offline
            # it claimed a download that never happened, a line before the one saying so (README walkthrough review).
            said_by_torch_hub = io.StringIO()
            messages = _silenced() if quiet else contextlib.redirect_stdout(said_by_torch_hub)
            with messages, torch.random.fork_rng(devices=[]):
                model = getattr(torchvision.models, name)(weights=tv_weights, progress=bar)
            sys.stderr.write(said_by_torch_hub.getvalue())
            return model, f"imagenet ({enum_name}.{member}{', cached' if cached else ', downloaded'})"
        except Exception as error:  # noqa: BLE001 - any download failure (no network, proxy, disk) lands here
            reason = first_line(error, 120)
            if weights == "imagenet" or not random_init_fallback:
                why = (
                    ""
                    if weights == "imagenet"
                    else " (--weights auto falls back to random init only for the demo and imagefolder datasets: a "
                    "run of the paper's datasets from random init ends far below the paper's numbers)"
                )
                raise UserError(
                    f"cannot get ImageNet weights for {name} (not in {_cached_weights_file(tv_weights).parent} "
                    f"and the download failed: {reason}); copy {os.path.basename(tv_weights.url)} there "
                    f"or pass --weights none/PATH{why}"
                ) from None
            log(
                f"warning: ImageNet weights for {name} are not cached and cannot be downloaded ({reason}); "
                f"training from random init, far below the paper's numbers (copy {os.path.basename(tv_weights.url)} "
                f"to {_cached_weights_file(tv_weights).parent}, or pass --weights imagenet to make this an error)"
            )
            return getattr(torchvision.models, name)(weights=None), "none (ImageNet weights unavailable)"
    if weights == "none":
        return getattr(torchvision.models, name)(weights=None, num_classes=source_classes), "none"

    state = load_weights_file(weights)
    fc_key = "fc.weight" if name.startswith("resnet") else "classifier.1.weight"
    num_source = state[fc_key].shape[0] if fc_key in state else 1000
    model = getattr(torchvision.models, name)(weights=None, num_classes=num_source)
    own = model.state_dict()
    # Same names, other shapes (a file of a wider variant): load_state_dict's traceback said so, several lines long.
    reshaped = [key for key in own if key in state and state[key].shape != own[key].shape]
    if reshaped:
        key = reshaped[0]
        raise UserError(
            f"weights file {weights} does not match {name}: {len(reshaped)} tensors of other shapes (e.g. {key}: "
            f"{list(state[key].shape)} in the file, {list(own[key].shape)} in {name}); is it another model's?"
        )
    # Names, by load_state_dict itself: BatchNorm fills in the num_batches_tracked that files from before it lack
    # (CSAIL's Places365 ResNet-50).
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        parts = [f"{len(missing)} missing keys (e.g. {missing[:2]})"] if missing else []
        parts += [f"{len(unexpected)} unexpected keys (e.g. {unexpected[:2]})"] if unexpected else []
        raise UserError(f"weights file {weights} does not match {name}: {', '.join(parts)}; is it another model's?")
    return model, f"file {weights} ({num_source}-way source head)"


# The source model of the paper's MIT-Indoor-67 results (SMILE_SPEC.md, Table 3; the authors' code loads it
# with --source_task places365). torchvision has no Places365 weights, so `auto` and `imagenet` start that dataset
# from ImageNet, and a run says so.
PLACES365_RESNET50_URL = "http://places2.csail.mit.edu/models_places365/resnet50_places365.pth.tar"


def paper_source_note(dataset: str, model: str, weights: str) -> str | None:
    """A note for a run whose pre-trained weights are not the paper's for its dataset, else None. Only
    MIT-Indoor-67 has other ones (Places365); a weights file or --weights none is the user's own choice."""
    if dataset != "indoor67" or weights not in ("auto", "imagenet"):
        return None
    return (
        "note: the paper's MIT-Indoor-67 results start from a Places365 ResNet-50, not from ImageNet weights; to "
        f"follow it, download {PLACES365_RESNET50_URL} and pass --weights resnet50_places365.pth.tar"
        + (" with --model resnet50" if model != "resnet50" else "")
    )


def build_models(
    name: str,
    num_classes: int,
    weights: str = "auto",
    with_aux_head: bool = True,
    log=print,
    source_classes=1000,
    quiet: bool = False,
    fetch: bool = True,
    random_init_fallback: bool = True,
) -> tuple[SmileNet, SourceNet, str]:
    """Student (with fc2 copied from the source head when `with_aux_head`) and the pre-trained source
    model (the teacher's starting point). source_classes, quiet, fetch, random_init_fallback: see
    build_source_model."""
    model, description = build_source_model(
        name,
        weights,
        log=log,
        source_classes=source_classes,
        quiet=quiet,
        fetch=fetch,
        random_init_fallback=random_init_fallback,
    )
    student, source = student_and_source(model, name, num_classes, with_aux_head)
    return student, source, description


def student_and_source(
    model: nn.Module, name: str, num_classes: int, with_aux_head: bool = True
) -> tuple[SmileNet, SourceNet]:
    """The student (a new `num_classes` head, and fc2 copied from the source head when `with_aux_head`) and the
    source model (the teacher's starting point) from a classifier build_source_model made. Apart from it so that
    a run reads its weights before it knows the dataset's classes (a weights error then comes before minutes of
    image checks)."""
    backbone, source_head = split_torchvision(model, name)
    student = SmileNet(copy.deepcopy(backbone), num_classes, source_head if with_aux_head else None)
    source = SourceNet(backbone, source_head)
    return student, source


# ---------------------------------------------------------------------------------------------
# BatchNorm folding. The teacher is always in eval mode, so each BatchNorm after a convolution is
# an affine map with constants: folding it into the convolution's weight and bias removes one
# full read and write of every activation (53 BatchNorms in ResNet-50).


def checkpoint_source_classes(state: dict) -> int:
    """The size of the source head a checkpoint holds (1000 for ImageNet, 365 for Places365): the student's
    fc2, else the teacher's fc; 1000 when it has neither (finetune, mixup, CutMix, which never read it)."""
    for part, key in (("student", "fc2.weight"), ("teacher", "fc.weight")):
        weight = (state.get(part) or {}).get(key)
        if weight is not None:
            return int(weight.shape[0])
    return 1000


def conv_bn_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """Names of (Conv2d, BatchNorm2d) pairs where the BatchNorm directly follows the convolution.

    Recognised: consecutive children of an nn.Sequential (ResNet stem, downsample, EfficientNet's
    Conv2dNormActivation), and sibling attributes `convN` / `bnN` (torchvision ResNet blocks).
    """
    pairs = []
    for parent_name, parent in module.named_modules():
        prefix = f"{parent_name}." if parent_name else ""
        children = list(parent.named_children())
        if isinstance(parent, nn.Sequential):
            for (name_a, a), (name_b, b) in zip(children, children[1:]):
                if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
                    pairs.append((prefix + name_a, prefix + name_b))
        else:
            named = dict(children)
            for name, child in children:
                if isinstance(child, nn.Conv2d) and name.startswith("conv"):
                    bn_name = "bn" + name[len("conv") :]
                    if isinstance(named.get(bn_name), nn.BatchNorm2d):
                        pairs.append((prefix + name, prefix + bn_name))
    return pairs


def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d, target: nn.Conv2d) -> None:
    """target.weight, target.bias <- conv followed by bn (eval statistics), as one biased conv."""
    # At least float32 arithmetic, float64 when the teacher is float64 (exact fold in tests).
    dtype = torch.promote_types(conv.weight.dtype, torch.float32)
    scale = bn.weight.to(dtype) * torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
    bias = bn.bias.to(dtype) - bn.running_mean.to(dtype) * scale
    if conv.bias is not None:
        bias = bias + conv.bias.to(dtype) * scale
    target.weight.copy_(conv.weight.to(dtype) * scale.view(-1, 1, 1, 1))
    target.bias.copy_(bias)


def _fold_pairs_foreach(convs: list[nn.Conv2d], bns: list[nn.BatchNorm2d], targets: list[nn.Conv2d]) -> None:
    """`_fold_pair` for every pair at once, with the same arithmetic (bit for bit): multi-tensor ops for
    the scales and biases and one copy of all weights, then one in-place scaling per weight. For
    ResNet-50 (53 pairs) that is about 60 launches instead of 424, every EMA update (counted on CPU)."""
    variances = torch._foreach_add([bn.running_var for bn in bns], [bn.eps for bn in bns])
    torch._foreach_rsqrt_(variances)
    scales = torch._foreach_mul([bn.weight for bn in bns], variances)
    biases = torch._foreach_sub([bn.bias for bn in bns], torch._foreach_mul([bn.running_mean for bn in bns], scales))
    torch._foreach_copy_([target.bias for target in targets], biases)
    torch._foreach_copy_([target.weight for target in targets], [conv.weight for conv in convs])
    for target, scale in zip(targets, scales):
        target.weight.mul_(scale.view(-1, 1, 1, 1))


class FoldedBackbone(nn.Module):
    """An inference-only copy of a backbone with every conv+BN pair folded into one biased conv.

    `refresh(source)` recomputes the folded weights from the (EMA-updated) unfolded backbone; the
    fold is exact up to float rounding.
    """

    def __init__(self, source: nn.Module):
        super().__init__()
        self.folded = copy.deepcopy(source).eval()
        self.pairs = conv_bn_pairs(self.folded)
        for conv_name, bn_name in self.pairs:
            conv = self.folded.get_submodule(conv_name)
            if conv.bias is None:
                conv.bias = nn.Parameter(
                    torch.zeros(conv.out_channels, dtype=conv.weight.dtype, device=conv.weight.device)
                )
            _set_submodule(self.folded, bn_name, nn.Identity())
        for parameter in self.folded.parameters():
            parameter.requires_grad_(False)
        self.refresh(source)

    @torch.no_grad()
    def refresh(self, source: nn.Module) -> None:
        convs = [source.get_submodule(conv_name) for conv_name, _ in self.pairs]
        bns = [source.get_submodule(bn_name) for _, bn_name in self.pairs]
        targets = [self.folded.get_submodule(conv_name) for conv_name, _ in self.pairs]
        tensors = [t for bn in bns for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)]
        tensors += [conv.weight for conv in convs] + [t for target in targets for t in (target.weight, target.bias)]
        if (
            all(conv.bias is None for conv in convs)
            and len({(t.dtype, t.device) for t in tensors}) == 1
            and tensors[0].dtype in (torch.float32, torch.float64)
        ):
            _fold_pairs_foreach(convs, bns, targets)
        else:
            for conv, bn, target in zip(convs, bns, targets):
                _fold_pair(conv, bn, target)
        # Parameters of layers that have no BatchNorm partner (none in ResNets) follow the source.
        folded_names = {name for pair in self.pairs for name in pair}
        for name, parameter in source.named_parameters():
            owner = name.rsplit(".", 1)[0]
            if owner not in folded_names:
                self.folded.get_parameter(name).copy_(parameter)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.folded(images)


def _set_submodule(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
