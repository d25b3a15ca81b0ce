"""LoRA adapters through peft: attach to a backbone, check the target layers exist, merge for export.

LoRA (Hu et al., arXiv 2106.09685) freezes W and learns ΔW = (alpha / r) · B A with A ∈ R^{r×k}, B ∈ R^{d×r}
(B starts at zero, so training starts from the backbone). Merging writes W + ΔW back into each layer, giving a
plain model that any Hugging Face or sentence-transformers loader reads without peft.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


class LoraTargetError(ValueError):
    """The configured target modules do not exist in the backbone."""


def linear_layer_names(model: nn.Module) -> list[str]:
    """Sorted last-component names of the model's Linear layers (what peft's ``target_modules`` match)."""
    return sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, nn.Linear)})


def check_targets(model: nn.Module, targets: Sequence[str], model_name: str = "the backbone") -> None:
    """Every target must name some Linear layer; otherwise training would silently adapt fewer layers."""
    present = set(linear_layer_names(model))
    missing = [t for t in targets if t not in present]
    if missing:
        raise LoraTargetError(
            f"lora.target_modules {missing} match no Linear layer of {model_name} "
            f"({getattr(getattr(model, 'config', None), 'model_type', '?')}); its Linear layers are named "
            f"{sorted(present)}. Set lora.target_modules to some of these (e.g. query/key/value/dense for BERT)."
        )


def apply_lora(model: nn.Module, r: int, alpha: int, dropout: float, targets: Sequence[str],
               model_name: str = "the backbone") -> nn.Module:
    """Wrap ``model`` in a peft model whose only trainable parameters are the adapters."""
    from peft import LoraConfig, get_peft_model

    check_targets(model, targets, model_name)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")
    return get_peft_model(model, cfg)


def is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency; without it no model can be a PeftModel
        return False
    return isinstance(model, PeftModel)


def merged(model: nn.Module) -> nn.Module:
    """The plain backbone with adapters merged in (W + alpha/r · B A); a non-peft model is returned as is."""
    if not is_peft(model):
        return model
    return model.merge_and_unload()


def trainable_summary(model: nn.Module) -> dict[str, int]:
    """Counts of trainable and total parameters (logged and stored in the checkpoint fingerprint)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable_params": trainable, "total_params": total}
