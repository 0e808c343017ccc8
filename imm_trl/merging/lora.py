"""The in-place LoRA merger for a live PEFT model (one call per IMM iteration).

With LoRA, theta_t^SFT = G_{t-1} + dW_t, so the IMM update of each targeted weight is

    G_t = theta0 + alpha * M(G_{t-1} - theta0 + dW_t)

and every other weight stays theta0. `LoraMerger` keeps theta0 of the targeted weights only
(in memory, see `capture_theta0_`, or read back from the original safetensors at merge
time), takes dW from PEFT's
own `get_delta_weight` (so LoRA scaling, rsLoRA and `fan_in_fan_out` are PEFT's), writes
G_t into the base layers in place, and re-initialises the adapter (B = 0) so the next
iteration trains a fresh one on G_t.

QLoRA (bitsandbytes 4-bit / 8-bit base layers): G is kept as a bf16 master copy of each
targeted weight; the merge updates the master and re-quantizes the layer from it, so the
quantization error of one iteration never feeds the next.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from imm_trl.merging.config import MergeConfig, check_ratio_patterns, merge_method, parse_ratio
from imm_trl.merging.functional import merge_into_, merge_low_rank_into_, merge_tensors
from imm_trl.merging.io import CheckpointReader
from imm_trl.merging.parallel import for_each_tensor
from imm_trl.merging.quantization import dequantize, is_quantized, requantize
from imm_trl.merging.state_dict import aliased_tensors, capture_theta0_, moving_average, view_key

PEFT_PREFIX = "base_model.model."
RESETTABLE_INITS = (True, "gaussian")


@dataclass
class MergeTarget:
    """One base weight that LoRA layers write into (several layers if the weight is tied)."""

    name: str  # parameter name in the base model, e.g. model.layers.0.mlp.up_proj.weight
    layers: list = field(default_factory=list)  # PEFT LoraLayer modules writing into this weight
    theta0: torch.Tensor | None = None  # on the CPU; None when read from theta0_dir
    master: torch.Tensor | None = None  # bf16 master copy of G for quantized layers

    @property
    def base_layer(self) -> nn.Module:
        return self.layers[0].get_base_layer()

    @property
    def quantized(self) -> bool:
        return is_quantized(self.base_layer.weight)


@dataclass
class SavedModuleTarget:
    """A `modules_to_save` parameter: the trained copy is merged into the original.

    The parameters are looked up in their modules when used rather than held, so that a
    parameter swapped for another while merging (FSDP2: its full tensor, see
    `imm_trl.distributed.whole_parameters`) is the one merged.
    """

    name: str
    original_module: nn.Module
    trained_module: nn.Module
    param_name: str  # e.g. `weight`, relative to both modules
    theta0: torch.Tensor | None = None

    @property
    def original(self) -> nn.Parameter:
        return self.original_module.get_parameter(self.param_name)

    @property
    def trained(self) -> nn.Parameter:
        return self.trained_module.get_parameter(self.param_name)


def base_parameter_name(module_name: str) -> str:
    """`base_model.model.model.layers.0.q_proj` -> `model.layers.0.q_proj.weight`."""
    stripped = (
        module_name[len(PEFT_PREFIX) :] if module_name.startswith(PEFT_PREFIX) else module_name
    )
    return f"{stripped}.weight"


class LoraMerger:
    """Merge a PEFT LoRA adapter into its base model in place, IMM style, and reset it.

    Build it once, before the first iteration trains (it captures theta0); call
    `merge(model, iteration)` after each iteration.

    Args:
        model: The `PeftModel` (LoRA, not DoRA).
        config: Method, ratio (number, per-layer map or per-iteration schedule), density, seed.
        adapter_name: The adapter to merge; default the active one.
        theta0_dir: Read theta0 from this safetensors model directory at each merge instead
            of keeping it in memory (the directory the base model was loaded from).
        master_dtype: Dtype of the master copy kept for quantized layers.
        reset_seed: Seed for re-initialising the adapter; None uses the global RNG.
    """

    def __init__(
        self,
        model: nn.Module,
        config: MergeConfig,
        adapter_name: str | None = None,
        theta0_dir: str | os.PathLike | None = None,
        master_dtype: torch.dtype = torch.bfloat16,
        reset_seed: int | None = None,
    ):
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import ModulesToSaveWrapper

        self.config = config
        self.adapter = adapter_name or getattr(model, "active_adapter", "default")
        self.theta0_dir = Path(theta0_dir) if theta0_dir is not None else None
        self.master_dtype = master_dtype
        self.reset_seed = reset_seed
        self.targets: dict[object, MergeTarget] = {}
        self.saved_modules: list[SavedModuleTarget] = []
        self.init_lora_weights = self._init_lora_weights(model)

        for module_name, module in model.named_modules():
            if isinstance(module, LoraLayer) and self._has_adapter(module):
                self._check_supported(module_name, module)
                weight = module.get_base_layer().weight
                # Keyed by memory, not object: weights tied through shared storage merge once.
                key = view_key(weight) or id(weight)
                target = self.targets.setdefault(
                    key, MergeTarget(name=base_parameter_name(module_name))
                )
                target.layers.append(module)
            elif (
                isinstance(module, ModulesToSaveWrapper) and self.adapter in module.modules_to_save
            ):
                self._add_saved_module(module_name, module)
        if not self.targets and not self.saved_modules:
            raise ValueError(
                f"the model has no LoRA layers or modules_to_save for adapter {self.adapter!r}"
            )
        merged_names = [t.name for t in self.targets.values()] + [
            s.name for s in self.saved_modules
        ]
        check_ratio_patterns(config.ratio, merged_names, "the LoRA-targeted weights")
        self._capture_theta0(aliased_tensors(model))

    def _has_adapter(self, module) -> bool:
        return self.adapter in module.lora_A or self.adapter in getattr(
            module, "lora_embedding_A", {}
        )

    def _init_lora_weights(self, model) -> bool | str:
        peft_config = getattr(model, "peft_config", {}).get(self.adapter)
        init = getattr(peft_config, "init_lora_weights", True)
        # Other initialisations (PiSSA, OLoRA, LoftQ, ...) rewrite the base weights themselves,
        # which would make the adapter's starting point differ from G_t.
        if init not in RESETTABLE_INITS and init is not False:
            raise ValueError(
                f"init_lora_weights={init!r} rewrites the base weights when the adapter is created, "
                "so a fresh adapter would not start from the merged model; use True or 'gaussian'"
            )
        return init if init in RESETTABLE_INITS else True

    def _check_supported(self, module_name: str, module) -> None:
        if module.use_dora.get(self.adapter, False):
            raise ValueError(
                f"{module_name} uses DoRA; its magnitude vector rescales the whole weight, which the "
                "IMM formula theta0 + alpha*(G - theta0 + dW) does not cover. Use use_dora=False."
            )
        if getattr(module, "merged", False):
            raise ValueError(
                f"{module_name} already has an adapter merged in; call unmerge_adapter() first"
            )
        if self.adapter in getattr(module, "lora_variant", {}):
            raise ValueError(
                f"{module_name} uses a LoRA variant ({type(module.lora_variant[self.adapter]).__name__}); only plain LoRA is supported"
            )

    def _add_saved_module(self, module_name: str, wrapper) -> None:
        trained_module = wrapper.modules_to_save[self.adapter]
        seen = {id(t.trained) for t in self.saved_modules}
        for param_name, _ in wrapper.original_module.named_parameters():
            if id(trained_module.get_parameter(param_name)) in seen:
                continue
            stripped = (
                module_name[len(PEFT_PREFIX) :]
                if module_name.startswith(PEFT_PREFIX)
                else module_name
            )
            self.saved_modules.append(
                SavedModuleTarget(
                    name=f"{stripped}.{param_name}",
                    original_module=wrapper.original_module,
                    trained_module=trained_module,
                    param_name=param_name,
                    theta0=None,
                )
            )

    @torch.no_grad()
    def _capture_theta0(self, aliased: set[int]) -> None:
        for saved in self.saved_modules:
            saved.theta0 = capture_theta0_(saved.original, id(saved.original) in aliased)
        reader = CheckpointReader(self.theta0_dir) if self.theta0_dir is not None else None
        try:
            for target in self.targets.values():
                weight = target.base_layer.weight
                if reader is not None:
                    if target.name not in set(reader.names()):
                        raise ValueError(
                            f"theta0_dir {self.theta0_dir} has no tensor {target.name}"
                        )
                    theta0 = None
                elif target.quantized:
                    theta0 = dequantize(target.base_layer).to(
                        "cpu", dtype=self.master_dtype, copy=True
                    )
                else:
                    theta0 = capture_theta0_(weight, id(weight) in aliased)
                target.theta0 = theta0
                if target.quantized:
                    source = reader.read(target.name) if reader is not None else theta0
                    target.master = source.to(
                        target.base_layer.weight.device, dtype=self.master_dtype, copy=True
                    )
        finally:
            if reader is not None:
                reader.close()

    @torch.no_grad()
    def merge(
        self, model: nn.Module | None = None, iteration: int = 1, reset: bool = True, ratio=None
    ) -> None:
        """Merge the adapter into the base weights at iteration `iteration`'s ratio (or at
        `ratio`, a number or ratio map, when given), in place, then (if `reset`) re-initialise
        the adapter. `model` is accepted for symmetry with `FullWeightMerger`; the layers found
        at construction are the ones merged."""
        ratio_map = parse_ratio(ratio) if ratio is not None else self.config.ratio_map(iteration)
        reader = CheckpointReader(self.theta0_dir) if self.theta0_dir is not None else None
        try:
            per_thread = threading.local()  # each merge thread reuses its own work buffers

            def merge_one(target: MergeTarget) -> None:
                if not hasattr(per_thread, "buffers"):
                    per_thread.buffers = {}
                ratio = ratio_map.ratio_for(target.name)
                self._merge_target(target, ratio, reader, iteration, per_thread.buffers)

            for_each_tensor(
                merge_one,
                # largest first, so that no thread is left with a big tensor at the end
                sorted(self.targets.values(), key=lambda t: -t.base_layer.weight.numel()),
                on_cpu=all(t.base_layer.weight.device.type == "cpu" for t in self.targets.values()),
            )
            for saved in self.saved_modules:
                theta0 = saved.theta0.to(saved.original.device)
                merged = merge_tensors(
                    theta0,
                    saved.trained.detach(),
                    ratio=ratio_map.ratio_for(saved.name),
                    name=saved.name,
                    **self.config.kernel_kwargs(iteration),
                )
                saved.original.copy_(merged)
                saved.trained.copy_(merged)
        finally:
            if reader is not None:
                reader.close()
        if reset:
            self.reset_adapter()

    def _merge_target(self, target: MergeTarget, ratio: float, reader, iteration: int, buffers: dict) -> None:
        layer_weight = target.base_layer.weight
        current = target.master if target.quantized else layer_weight.data
        theta0 = reader.read(target.name) if reader is not None else target.theta0
        theta0 = theta0.to(current.device, dtype=current.dtype)
        settings = self.config.kernel_kwargs(iteration)
        if self._low_rank_mergeable(target, current):
            layer = target.layers[0]
            merge_low_rank_into_(
                current,
                theta0,
                layer.lora_B[self.adapter].weight.detach(),
                layer.lora_A[self.adapter].weight.detach(),
                layer.scaling[self.adapter],
                ratio=ratio,
                name=target.name,
                buffers=buffers,
                **settings,
            )
            return
        delta_w = target.layers[0].get_delta_weight(self.adapter)
        for layer in target.layers[1:]:  # tied weights: every layer writing into it
            delta_w = delta_w + layer.get_delta_weight(self.adapter)
        # theta_t^SFT = G_{t-1} + dW_t; G_t = theta0 + alpha * M(theta_t^SFT - theta0)
        merge_into_(current, theta0, delta_w, ratio=ratio, name=target.name, **settings)
        if target.quantized:
            requantize(target.base_layer, target.master)

    def _low_rank_mergeable(self, target: MergeTarget, current: torch.Tensor) -> bool:
        """Whether `merge_low_rank_into_` computes exactly what PEFT's dW would give: one plain
        LoRA Linear (no tied weights, no fan_in_fan_out), everything on the CPU, an elementwise
        method in fp32."""
        from peft.tuners.lora import Linear

        layer = target.layers[0]
        return (
            len(target.layers) == 1
            and type(layer) is Linear
            and not layer.fan_in_fan_out
            and current.device.type == "cpu"
            and current.dim() == 2
            and current.is_contiguous()
            and layer.lora_B[self.adapter].weight.device.type == "cpu"
            and merge_method(self.config.method).in_place
            and self.config.torch_compute_dtype == torch.float32
        )

    def _live_tensors(self) -> dict[str, torch.Tensor]:
        """Everything `merge` writes: each target's weight (its master if quantized), each
        modules_to_save copy, and the adapter factors, by a unique name."""
        tensors = {}
        for target in self.targets.values():
            tensors[target.name] = target.master if target.quantized else target.base_layer.weight.data
            for index, layer in enumerate(target.layers):
                for name, param in layer.named_parameters():
                    if "lora_" in name:
                        tensors[f"{target.name}#{index}.{name}"] = param.data
        for saved in self.saved_modules:
            tensors[f"{saved.name}#original"] = saved.original.data
            tensors[f"{saved.name}#trained"] = saved.trained.data
        return tensors

    @torch.no_grad()
    def state_tensors(self, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Copies of everything `merge` changes, to try a merge and undo it
        (`load_state_tensors`)."""
        return {name: tensor.clone() for name, tensor in self._live_tensors().items()}

    @torch.no_grad()
    def load_state_tensors(self, model: nn.Module | None, tensors: dict[str, torch.Tensor]) -> None:
        """Put back what `state_tensors` copied (re-quantizing quantized layers)."""
        for name, tensor in self._live_tensors().items():
            tensor.copy_(tensors[name])
        for target in self.targets.values():
            if target.quantized:
                requantize(target.base_layer, target.master)

    def anchor_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors merges are anchored at (theta0 at first), by parameter name."""
        if self.theta0_dir is not None:
            raise ValueError("a moving anchor needs theta0 in memory; build the merger without theta0_dir")
        anchors = {t.name: t.theta0 for t in self.targets.values()}
        return {**anchors, **{s.name: s.theta0 for s in self.saved_modules}}

    @torch.no_grad()
    def move_anchor_(self, model: nn.Module | None, decay: float) -> None:
        """anchor <- decay * anchor + (1 - decay) * G, G the weights after the last merge (an
        exponential moving average of the merged models, as in WARP). New tensors, so a
        memory-mapped theta0 is never written."""
        for target in self.targets.values():
            current = target.master if target.quantized else target.base_layer.weight.data
            target.theta0 = moving_average(target.theta0, current, decay)
        for saved in self.saved_modules:
            saved.theta0 = moving_average(saved.theta0, saved.original.data, decay)

    def load_anchor_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Replace the anchors with `tensors` (a checkpoint's), by parameter name."""
        for target in self.targets.values():
            target.theta0 = tensors[target.name].to(target.theta0.dtype).clone()
        for saved in self.saved_modules:
            saved.theta0 = tensors[saved.name].to(saved.theta0.dtype).clone()

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """Re-initialise the adapter (B = 0, A fresh) so the model equals the merged weights."""
        with torch.random.fork_rng(devices=[], enabled=self.reset_seed is not None):
            if self.reset_seed is not None:
                torch.manual_seed(self.reset_seed)
            for target in self.targets.values():
                for layer in target.layers:
                    layer.reset_lora_parameters(self.adapter, self.init_lora_weights)

    def theta0_bytes(self) -> int:
        """Memory held for theta0 and master copies, in bytes."""
        tensors = [t.theta0 for t in self.targets.values()] + [
            t.master for t in self.targets.values()
        ]
        tensors += [s.theta0 for s in self.saved_modules]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    # -- the rest of the `Merger` protocol (imm_trl.merging.protocol) ---------------------------

    def merged_parameter_names(self) -> list[str]:
        return [t.name for t in self.targets.values()] + [s.name for s in self.saved_modules]

    def anchored_weights(self, model: nn.Module | None = None):
        """(name, anchor, base or master weight plus the adapter's delta) per merged weight."""
        for target in self.targets.values():
            base = target.master if target.quantized else target.base_layer.weight.detach()
            delta = sum(layer.get_delta_weight(self.adapter).float() for layer in target.layers)
            yield target.name, target.theta0, base.float() + delta
        for saved in self.saved_modules:
            yield saved.name, saved.theta0, saved.trained.detach()

    def merged_tensors(self, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        tensors = {
            t.name: t.master if t.quantized else t.base_layer.weight for t in self.targets.values()
        }
        tensors.update({s.name: s.original for s in self.saved_modules})
        return tensors

    @torch.no_grad()
    def load_merged_tensors(self, model: nn.Module | None, tensors: dict[str, torch.Tensor]) -> None:
        for target in self.targets.values():
            if target.quantized:
                target.master.copy_(tensors[target.name])
                requantize(target.base_layer, target.master)
            else:
                target.base_layer.weight.copy_(tensors[target.name])
        for saved in self.saved_modules:
            saved.original.copy_(tensors[saved.name])

    def master_tensors(self) -> dict[str, torch.Tensor]:
        return {t.name: t.master for t in self.targets.values() if t.quantized}

    @torch.no_grad()
    def load_master_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        targets = {t.name: t for t in self.targets.values() if t.quantized}
        for name, tensor in tensors.items():
            targets[name].master.copy_(tensor)
            requantize(targets[name].base_layer, targets[name].master)
