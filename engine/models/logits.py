"""The output-logit transform: what a model's forward does between lm_head and its logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from profuser.kernels.params import softcap


@dataclass(frozen=True)
class LogitTransform:
    """z = softcap(scale * (W h)) with softcap(x) = c * tanh(x / c); scale 1 and no cap for most models.

    Every family transformers ships applies at most these two, scale first (Muse: output_multiplier
    then the cap); teach, generate (through the HF forward), eval and the training step all use this one
    rule, so a teacher's stored NLL, the eval NLL and the student's loss see the same logits. The
    training step applies `scale` to the hidden rows ((s h) W^T = s (W h)) and passes `softcap` to the
    fused loss, which never materializes the logits.
    """

    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, config) -> "LogitTransform":
        """The transform of a transformers config (a multimodal config's text_config is used)."""
        text = getattr(config, "text_config", None) or config
        kind = str(getattr(text, "model_type", "") or getattr(config, "model_type", ""))
        scale = 1.0
        if kind.startswith("cohere"):  # CohereForCausalLM: logits * logit_scale
            scale = float(getattr(text, "logit_scale", 1.0) or 1.0)
        elif kind.startswith("granite"):  # Granite: logits / logits_scaling
            scale = 1.0 / float(getattr(text, "logits_scaling", 1.0) or 1.0)
        elif kind == "hyperclovax":  # muP the other way round: logits * logits_scaling
            scale = float(getattr(text, "logits_scaling", 1.0) or 1.0)
        elif kind.startswith("muse"):
            scale = float(getattr(text, "output_multiplier", 1.0) or 1.0)
        cap = getattr(text, "final_logit_softcapping", None)
        return cls(scale=scale, softcap=float(cap) if cap else None)

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """Raw lm_head outputs [..., V] -> the model's logits [..., V] (computed in z's dtype)."""
        if self.scale != 1.0:
            z = z * self.scale
        return softcap(z, self.softcap or None)


def output_logits(model, h: torch.Tensor) -> torch.Tensor:
    """The model's logits for hidden rows h [N, H] -> [N, V] float32 (what model(...).logits holds)."""
    return LogitTransform.of(model.config).apply(model.get_output_embeddings()(h).float())
